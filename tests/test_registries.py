"""The built-in families are registries: metrics (``metrics.METRICS``) and convolution plans
(``convolutions.PLANS``). The digests that decide reuse of stored metrics are pinned to the values the code
gave before the metrics became a registry, and a member registered from outside (here, from a test) is
recorded, stored and selectable like the built-in ones."""


import numpy as np
import pytest
import torch

from serimats_func.core import metrics
from serimats_func.interventions import PerturbWeights
from serimats_func.loggers import Logger, register_metric
from serimats_func.run.identity import digest
from serimats_func.run.results import store_results
from serimats_func.store.zarr_store import Store

GRID = [PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
        PerturbWeights.make_variations(epsilon=(0.01,), seed=(1,))]

# computed on the code before the registry (commit 03d0760), for the tests' small MNIST-1D split
LOSS, TRAIN, TEST = "1aa13b298e5bce48", "c3f2148af9270447", "67775836fdb86740"  # loss key, data fingerprints
CONTROL = "4c272076bef7fb7d"  # the control's id then
PINNED = {
    "train_loss": "f6acbf71d229d0f9", "train_acc": "897525c6b1a98a80", "test_loss": "952dcc96991c244e",
    "test_acc": "953d74102500a65f", "param_norm": "3679a24fa4f19dbe", "init_distance": "fc71c8f308dc5816",
    "init_cosine": "71f404c1b1a5c1d5", "control_distance": "0a1a519d4c3d3fd5",
    "control_layer_distance": "f6351e09f68dbbcb", "control_cosine": "f7a6ee8599ca2089",
    "control_agreement": "cc89039ed6377a6c", "control_test_loss_diff": "4460676aa86e9477",
}
PINNED_TF32 = {
    "train_loss": "5837446686b72fde", "train_acc": "e3b5ec361ad675f7", "test_loss": "0e138e650b386acf",
    "test_acc": "9f077ac58545d056", "param_norm": "b99882a53787e902", "init_distance": "771d1eacf953ca5f",
    "init_cosine": "d0b0615c74e7e355", "control_distance": "efd210c3c839104b",
    "control_layer_distance": "5e273a0bd836b981", "control_cosine": "759ed3c7fca20cfb",
    "control_agreement": "4771cf71bdce9abf", "control_test_loss_diff": "48cdd65709a9d0b1",
}
# Digests of the user metrics' code. They changed once when the library's Logger base class came to be named
# rather than hashed (identity._is_protocol): from then on they depend on the user's code alone, not on where the
# library's modules live or how Logger is written (the layout move of "One open core" leaves them as they are).
PINNED_USER = {"weight_norm": "aea14053a1c2311b", "to_control": "4f41f885f0c91644"}


class PinLogger(Logger):
    @register_metric
    def weight_norm(self, learner):
        return learner.model[1].weight.norm()

    @register_metric
    def to_control(self, learner):
        return (learner.model[1].weight - learner.control.model[1].weight).norm()


def _expected(pinned: dict, control: str | None, precision: str = "float32") -> dict:
    """The pinned digests; those against the control recomputed with the old formula if the control's id is
    no longer the pinned one (learner ids may change on purpose; the metric keys' recipe may not)."""
    out = dict(pinned)
    if control != CONTROL:
        for name in out:
            if name.startswith("control_"):
                key = digest(["builtin", 1, name, control, LOSS, TEST])
                out[name] = key if precision == "float32" else digest([key, precision])
    return out


def test_metric_keys_are_those_of_the_code_before_the_registry(experiment):
    exp = experiment(GRID, steps=4, logger=PinLogger(), compile=False)
    assert exp._loss_key == LOSS and exp.base.data.fingerprint == TRAIN and exp.base.data.test_fingerprint == TEST
    assert exp.metric_names() == [*PINNED, "weight_norm", "to_control"]
    for spec in exp.grid.learners:
        keys = exp.metric_keys(spec)
        assert list(keys) == [*PINNED, "weight_norm", "to_control"]
        assert {k: keys[k] for k in PINNED} == _expected(PINNED, spec.control_id)
        assert {k: keys[k] for k in PINNED_USER} == PINNED_USER

    tf32 = experiment(GRID, steps=4, compile=False, precision="tf32")
    for spec in tf32.grid.learners:
        assert tf32.metric_keys(spec) == _expected(PINNED_TF32, spec.control_id, "tf32")

    plain = experiment([], steps=4, compile=False, evaluate=False)
    assert plain.metric_names() == ["param_norm", "init_distance", "init_cosine"]
    (spec,) = plain.grid.learners
    assert plain.metric_keys(spec) == {k: PINNED[k] for k in ("param_norm", "init_distance", "init_cosine")}


@pytest.fixture
def registered():
    """Register built-in metrics for one test: ``registered(spec)``; they are removed afterwards."""
    added = []

    def add(spec):
        added.append(metrics.register(spec).name)
        return spec

    yield add
    for name in added:
        metrics.unregister(name)


def test_a_registered_built_in_metric_is_recorded_keyed_and_stored(experiment, registered):
    registered(metrics.MetricSpec("layer_norms", lambda s: s.norms, dims=("layer",)))
    registered(metrics.MetricSpec("control_gap", lambda s: s.norms.sum(1) - s.norms.sum(1)[s.control],
                                  depends_on=("control",)))
    exp = experiment(GRID, steps=4, compile=False)
    assert exp.metric_names()[-2:] == ["layer_norms", "control_gap"]
    keys = exp.metric_keys(exp.grid.learners[0])
    assert keys["layer_norms"] == digest(["builtin", metrics.METRICS_VERSION, "layer_norms"])
    control = next(s.id for s in exp.grid.learners if s.control)
    assert keys["control_gap"] == digest(["builtin", metrics.METRICS_VERSION, "control_gap", control])
    ds = exp.run()
    assert ds.layer_norms.dims[-2:] == ("step", "layer")
    np.testing.assert_allclose(np.sqrt((ds.layer_norms ** 2).sum("layer", skipna=False)), ds.param_norm, rtol=1e-12)
    gap = ds.control_gap.isel(step=-1).values[ds.learner.values != ""]  # the control's and its learner's
    assert sorted(gap == 0) == [False, True] and np.isfinite(gap).all()
    again = experiment(GRID, steps=4, compile=False, store=exp.store.path)
    assert again.plan().to_train == 0  # stored with its key: reused
    stored = store_results(Store(exp.store.path))
    np.testing.assert_array_equal(stored.layer_norms.values.reshape(-1), ds.layer_norms.values.reshape(-1))
    # without controls the metric against the control is not recorded
    assert "control_gap" not in experiment([], steps=4, compile=False).metric_names()


def test_user_metric_names_may_not_take_a_registered_built_in_name(experiment, registered):
    registered(metrics.MetricSpec("weight_norm", lambda s: s.norms.sum(1)))
    exp = experiment(GRID, steps=4, compile=False, logger=PinLogger())
    with pytest.raises(ValueError, match="taken by a built-in metric"):
        exp.metric_keys(exp.grid.learners[0])


def test_a_registered_convolution_plan_is_selectable_and_gives_the_same_numbers(experiment, mnist_digits):
    from serimats_func.acceleration import convolutions
    from serimats_func.acceleration import prepare as acceleration
    from serimats_func.models import Lenet5

    plan = convolutions.ConvPlan("vmap_again", lambda model: {n: "vmap" for n in convolutions.convolutions_of(model)},
                                 devices=("cpu",))
    convolutions.register_plan(plan)
    try:
        assert "vmap_again" in convolutions.candidates(torch.device("cpu"))
        assert "vmap_again" not in convolutions.candidates(torch.device("cuda"))
        x, y = mnist_digits[0][:96], mnist_digits[1][:96]
        runs = {}
        for name in ("vmap", "vmap_again"):
            exp = experiment(GRID, model=Lenet5(), data=((x, y), (x[:32], y[:32])), steps=3, compile=False,
                             convolutions=name)
            runs[name] = exp.run()
            assert [r.plan for r in exp.speed_report] == [name]
        for metric in ("train_loss", "test_acc", "param_norm", "control_distance"):
            np.testing.assert_array_equal(runs["vmap_again"][metric].values, runs["vmap"][metric].values)
    finally:
        convolutions.unregister_plan("vmap_again")
    with pytest.raises(ValueError, match="vmap_again"):
        acceleration.Speed(convolutions="vmap_again")  # gone with its registration
