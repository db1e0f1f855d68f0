"""Built-in metrics on weights and against the control, each checked against a direct PyTorch computation on
hand-trained twins (float64); the control trains beside its learners, once, and is stored once."""

import numpy as np
import pytest
import torch
from torch import nn

from serimats_func.core.metrics import CONTROL_METRICS
from serimats_func.interventions import InitWeights, Optimizer, PerturbWeights
from serimats_func.store.zarr_store import Store
from tests.test_interventions import WeightTwin

GRID = [PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
        PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=(1, 2))]


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def test_each_built_in_metric_matches_a_direct_pytorch_computation_on_twins(experiment):
    exp = experiment(GRID, dtype=torch.float64, steps=12, log_every=6)
    ds = exp.run()
    x_test, y_test = exp.base.data.x_test, exp.base.data.y_test
    data = (exp.base.data.x, exp.base.data.y)

    def trained(spec):
        twin = WeightTwin(spec, data)
        start = flat(twin.module).clone()
        twin.run(12, 6)
        twin.module.eval()
        return twin.module, start

    control, _ = trained(next(s for s in exp.grid.learners if s.control))
    for cell, spec in exp.grid.cells:
        module, start = trained(spec)
        got = {m: ds[m].values[cell][-1] for m in ds.data_vars if "step" in ds[m].dims}  # at step 12
        w, wc = flat(module), flat(control)
        with torch.no_grad():
            logits, control_logits = module(x_test), control(x_test)
        expected = {
            "param_norm": w.norm(),
            "init_distance": torch.dist(w, start),
            "init_cosine": nn.functional.cosine_similarity(w, start, dim=0),
            "control_distance": torch.dist(w, wc),
            "control_cosine": nn.functional.cosine_similarity(w, wc, dim=0),
            "control_agreement": (logits.argmax(1) == control_logits.argmax(1)).double().mean(),
            "control_test_loss_diff": nn.functional.cross_entropy(logits, y_test)
            - nn.functional.cross_entropy(control_logits, y_test),
        }
        for name, value in expected.items():
            assert got[name] == pytest.approx(float(value), rel=1e-9, abs=1e-12), (spec.coords, name)
        pairs = zip(module.parameters(), control.parameters(), strict=True)
        layers = [float(torch.dist(p.detach(), q.detach())) for p, q in pairs]
        np.testing.assert_allclose(got["control_layer_distance"], layers, rtol=1e-9, atol=1e-12)
        assert ds.layer.values.tolist() == [name for name, _ in module.named_parameters()]
    # the metrics say what they should: 0.1 drifts further than 0.01, and step 0 is the learner's own init
    final = ds.control_distance.isel(step=-1)
    assert (final.sel(epsilon=0.1, seed=[1, 2]) > final.sel(epsilon=0.01, seed=[1, 2])).all()
    assert (ds.init_distance.sel(step=0).fillna(0) == 0).all() and (ds.init_cosine.sel(step=0).fillna(1) == 1).all()


def test_against_itself_the_control_has_distance_0_cosine_1_and_agreement_1(experiment):
    ds = experiment(GRID, steps=8, log_every=4).run()
    control = ds.sel(epsilon=0, seed=0)
    assert bool(control.control)
    assert (control.control_distance == 0).all() and (control.control_layer_distance == 0).all()
    assert (control.control_cosine == 1).all() and (control.control_agreement == 1).all()
    assert (control.control_test_loss_diff == 0).all()
    perturbed = ds.sel(epsilon=0.1).isel(step=-1)
    assert (perturbed.control_distance.dropna("seed") > 0).all() and (perturbed.control_cosine.dropna("seed") < 1).all()


def test_a_control_is_planned_into_every_chunk_of_its_learners_and_written_once(experiment):
    together = experiment(GRID).run()
    exp = experiment(GRID, max_learners_per_chunk=2)
    plan = exp.plan()
    assert [len(c.learners) for c in plan.chunks] == [2, 2, 2, 2] and plan.to_train == 5
    control_id = next(s.id for s in exp.grid.learners if s.control)
    assert all(c.learners[0].id == control_id for c in plan.chunks)  # trained beside each pair
    assert [len(c.again) for c in plan.chunks] == [0, 1, 1, 1]
    chunked = exp.run()
    assert len(Store(exp.store.path).index()[control_id]) == 1  # stored once
    for metric in together.data_vars:
        np.testing.assert_array_equal(together[metric].values, chunked[metric].values)


def test_a_stored_control_is_trained_again_beside_new_learners_and_not_written_twice(experiment, tmp_path):
    store = tmp_path / "shared.zarr"
    experiment(GRID[:1] + [PerturbWeights.make_variations(epsilon=0.01, seed=1)], store=store).run()
    before = Store(store).index()
    bigger = experiment(GRID, store=store)
    plan = bigger.plan()
    assert (plan.in_store, plan.to_train) == (2, 3) and [len(c.again) for c in plan.chunks] == [1]
    assert "1 control(s) trained again" in str(plan)
    ds = bigger.run()
    after = Store(store).index()
    assert all(after[i] == before[i] for i in before)  # the control (and the first learner) are not written again
    fresh = experiment(GRID).run()  # the same grid from scratch: the same numbers
    for metric in fresh.data_vars:
        np.testing.assert_array_equal(ds[metric].values, fresh[metric].values)


def test_a_learner_whose_control_needs_another_step_warns_and_gets_nan_against_the_control(experiment):
    grid = [InitWeights.make_variations(seed=range(2)),
            Optimizer.make_variations(optimizer=torch.optim.SGD, lr=0.05, control=True),
            Optimizer.make_variations(optimizer=torch.optim.Adam, lr=0.001)]
    with pytest.warns(UserWarning, match=r"2 learner\(s\) cannot train beside their control.*Adam.*control_\* metrics are NaN"):
        exp = experiment(grid)
    ds = exp.run()
    adam, sgd = ds.sel(optimizer="Adam", lr=0.001), ds.sel(optimizer="SGD", lr=0.05)
    for metric in CONTROL_METRICS:
        assert adam[metric].isnull().all(), metric
    assert (sgd.control_distance == 0).all()
    assert adam.test_acc.notnull().all() and adam.init_distance.isel(step=-1).notnull().all()


def test_metrics_are_recorded_at_log_at_steps_too(experiment):
    ds = experiment(GRID[:1], steps=10, log_every=5, log_at=[1, 2, 3]).run()
    assert ds.step.values.tolist() == [0, 1, 2, 3, 5, 10]


@pytest.mark.parametrize("log_at, message", [([20], "past the last step"), ([-1], "integers >= 0"), ("5", "a list of steps")])
def test_bad_log_at_is_refused_before_anything_is_written(experiment, log_at, message):
    with pytest.raises(ValueError, match=message):
        experiment(GRID[:1], steps=10, log_at=log_at)


def test_a_metric_that_edits_a_tensor_in_place_changes_neither_the_learner_nor_later_runs(experiment):
    """A metric gets copies of the learner's tensors: ``.mul_`` on them changes only the copy."""
    from serimats_func.loggers import Logger, register_metric

    class Editing(Logger):
        @register_metric
        def halved_norm(self, learner):
            return learner.params["1.weight"].mul_(0.5).sum()

    plain = experiment([], log_every=4).run()
    edited = experiment([], log_every=4, logger=Editing()).run()
    np.testing.assert_array_equal(plain.train_loss.values, edited.train_loss.values)
