"""The straight path between two learners' weights (core.interpolation, the control_barrier metrics and
serimats_func.interpolate) against a plain PyTorch loop over alphas that interpolates state_dicts by hand."""

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import stack_module_state

from serimats_func import interpolate
from serimats_func.core.interpolation import PathEvaluation, along_path, barrier
from serimats_func.core.metrics import BARRIER_ALPHAS, METRICS, Evaluation, Snapshot
from serimats_func.core.state import ModelState
from serimats_func.interventions import DataOrder
from serimats_func.models import MLP
from tests import builders

ALPHAS = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
BARRIER_METRICS = ["control_barrier", "control_barrier_loss", "control_barrier_curve"]


def by_hand(module_a: nn.Module, module_b: nn.Module, alphas, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Loss and error (A,) of ``(1 - alpha) * a + alpha * b``: each state_dict interpolated tensor by tensor
    (integer buffers: a's), loaded into a copy of the module, evaluated in eval mode on the whole set."""
    sa, sb = module_a.state_dict(), module_b.state_dict()
    losses, errors = [], []
    for alpha in [float(a) for a in alphas]:
        point = copy.deepcopy(module_a).eval()
        point.load_state_dict({k: (1 - alpha) * v + alpha * sb[k] if v.is_floating_point() else v
                               for k, v in sa.items()})
        with torch.no_grad():
            logits = point(x)
        losses.append(float(nn.functional.cross_entropy(logits, y)))
        errors.append(1 - float((logits.argmax(1) == y).double().mean()))
    return np.array(losses), np.array(errors)


def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    """The tests' experiments' test set, in float64."""
    x, y = builders.small_mnist1d()[1].tensors
    return x.double(), y


def stacked(modules) -> ModelState:
    params, buffers = stack_module_state(modules)
    return ModelState({k: v.detach() for k, v in params.items()}, buffers)


def data(n=60, features=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10)).double()


def batchnorm_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)).double()
    with torch.no_grad():  # running statistics of their own, as after training
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(seed + 3)
    return model


# -- the core function ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("points_per_pass", [None, 3])  # 3: passes of 3, 3, 3 and a lone last point
def test_along_path_is_the_torch_loop_over_alphas_float64(points_per_pass):
    x, y = data()
    a, b = [mlp(1), mlp(2)], [mlp(3), mlp(4)]
    path = along_path(a[0], nn.functional.cross_entropy, stacked(a), stacked(b), ALPHAS, x, y, batch_size=7,
                      points_per_pass=points_per_pass)
    assert path.loss.shape == path.error.shape == (2, 5) and path.loss.dtype == torch.float64
    for i in range(2):
        loss, error = by_hand(a[i], b[i], ALPHAS, x, y)
        np.testing.assert_allclose(path.loss[i].numpy(), loss, rtol=0, atol=1e-10)
        np.testing.assert_allclose(path.error[i].numpy(), error, rtol=0, atol=1e-12)


def test_batchnorm_statistics_are_interpolated_and_integer_buffers_are_a_s():
    x, y = data()
    a, b = [batchnorm_mlp(1), batchnorm_mlp(2)], [batchnorm_mlp(3), batchnorm_mlp(4)]
    template = a[0].train()
    path = along_path(template, nn.functional.cross_entropy, stacked(a), stacked(b), ALPHAS, x, y, batch_size=16)
    assert template.training, "the template's mode is restored"
    for i in range(2):
        loss, error = by_hand(a[i], b[i], ALPHAS, x, y)
        np.testing.assert_allclose(path.loss[i].numpy(), loss, rtol=0, atol=1e-10)
        np.testing.assert_allclose(path.error[i].numpy(), error, rtol=0, atol=1e-12)
    # with a's statistics all along the path the midpoint's loss is another number: the statistics do move
    b_own = copy.deepcopy(b[0])
    b_own[1].load_state_dict(a[0][1].state_dict())
    loss_a_stats, _ = by_hand(a[0], b_own, ALPHAS, x, y)
    assert abs(loss_a_stats[2] - float(path.loss[0, 2])) > 1e-3


def test_a_path_from_a_learner_to_itself_is_flat_and_its_barrier_is_zero():
    x, y = data()
    a = [mlp(1), mlp(2)]
    path = along_path(a[0], nn.functional.cross_entropy, stacked(a), stacked(a), ALPHAS, x, y)
    assert torch.equal(path.loss, path.loss[:, :1].expand(2, 5))  # lerp(a, a, alpha) is a, bitwise
    assert barrier(path.error).tolist() == [0.0, 0.0] and barrier(path.loss).tolist() == [0.0, 0.0]


def test_the_barrier_metrics_of_a_snapshot_read_the_ends_from_its_evaluation():
    """control_path: the learner's and the control's test evaluation at alpha 0 and 1, the nine points between
    from along_path (asked once for the three metrics); the barrier is the peak above the mean of the ends."""
    inner = torch.tensor([[0.5] * 9, [0.2] * 4 + [0.9] + [0.2] * 4], dtype=torch.float64)  # (N=2, 9)
    asked = []

    def path(split, alphas):
        asked.append((split, alphas.tolist()))
        return PathEvaluation(inner * 10, inner)

    acc, loss = torch.tensor([0.8, 0.6], dtype=torch.float64), torch.tensor([1.0, 3.0], dtype=torch.float64)
    w = {"w": torch.zeros(2, 3)}
    s = Snapshot(w, w, control=torch.tensor([0, 0]), evaluate=lambda split, p: Evaluation(loss, acc), along_path=path)
    curve = METRICS["control_barrier_curve"].fn(s)  # (N, 11): learner 1's control is learner 0
    assert curve[:, 0].tolist() == pytest.approx([0.2, 0.4]) and curve[:, -1].tolist() == pytest.approx([0.2, 0.2])
    assert METRICS["control_barrier"].fn(s).tolist() == pytest.approx([0.5 - 0.2, 0.9 - 0.3])
    assert METRICS["control_barrier_loss"].fn(s).tolist() == pytest.approx([5.0 - 1.0, 9.0 - 2.0])
    assert asked == [("test", list(BARRIER_ALPHAS[1:-1]))]


# -- the built-in metrics against the control -------------------------------------------------------------------

@pytest.fixture
def spawned(experiment):
    """A control and two children with their own data order from step 8, in float64, with the barrier metrics
    at the last step and a state kept at step 8."""
    exp = experiment([DataOrder.make_variations(seed=0, control=True), DataOrder.make_variations(seed=(1, 2), at=8)],
                     dtype=torch.float64, log_every=8, keep_states=[8],
                     metrics={"control_barrier": dict(at=[16]), "control_barrier_loss": dict(at=[16]),
                              "control_barrier_curve": dict(at=[16])})
    return exp, exp.run()


def test_control_barrier_is_the_barrier_computed_by_hand_from_load_learner(spawned):
    exp, ds = spawned
    x, y = held_out()
    control, _ = exp.load_learner(seed=0, at=0)
    alphas = np.array(BARRIER_ALPHAS)
    assert ds.alpha.values.tolist() == list(BARRIER_ALPHAS)
    for seed in (1, 2):
        child, _ = exp.load_learner(seed=seed, at=8)
        loss, error = by_hand(child, control, alphas, x, y)
        at = dict(seed=seed, at=8, step=16)
        np.testing.assert_allclose(ds.control_barrier_curve.sel(at).values, error, rtol=0, atol=1e-12)
        assert float(ds.control_barrier.sel(at)) == pytest.approx(error.max() - (error[0] + error[-1]) / 2, abs=1e-12)
        assert float(ds.control_barrier_loss.sel(at)) == pytest.approx(loss.max() - (loss[0] + loss[-1]) / 2, abs=1e-10)
        assert float(ds.control_barrier_loss.sel(at)) > 0  # children apart from the control: a real path
    assert np.isnan(ds.control_barrier.sel(step=8)).all()  # asked at step 16 only


def test_control_barrier_is_zero_for_the_control(spawned):
    _, ds = spawned
    at = dict(seed=0, at=0, step=16)
    assert float(ds.control_barrier.sel(at)) == 0.0 and float(ds.control_barrier_loss.sel(at)) == 0.0
    curve = ds.control_barrier_curve.sel(at).values
    assert (curve == curve[0]).all()


def test_the_barrier_metrics_are_recorded_only_when_asked(experiment):
    ds = experiment([DataOrder.make_variations(seed=0, control=True), DataOrder.make_variations(seed=1)]).run()
    assert not set(BARRIER_METRICS) & set(ds.data_vars)
    assert "alpha" not in ds.dims


# -- serimats_func.interpolate ------------------------------------------------------------------------------

def test_interpolate_two_stored_learners_at_a_kept_step(spawned):
    exp, ds = spawned
    x, y = held_out()
    a, b = ds.learner.sel(seed=1, at=8), ds.learner.sel(seed=2, at=8)
    path = interpolate(exp, a, b, ALPHAS.tolist(), (x, y), step=8)
    loss, error = by_hand(exp.load_learner(8, seed=1, at=8)[0], exp.load_learner(8, seed=2, at=8)[0], ALPHAS, x, y)
    assert path.alpha.values.tolist() == ALPHAS.tolist()
    np.testing.assert_allclose(path.loss.values, loss, rtol=0, atol=1e-10)
    np.testing.assert_allclose(path.error.values, error, rtol=0, atol=1e-12)
    np.testing.assert_allclose(path.acc.values, 1 - error, rtol=0, atol=1e-12)
    assert (path.attrs["a"], path.attrs["b"], path.attrs["step_a"]) == (str(a.values), str(b.values), 8)
    # children spawned at step 8 are still their control there: the path is one point
    assert np.ptp(path.loss.values) < 1e-12
    # the final state by default, from the store's path, by coordinates and by id
    final = interpolate(exp.store.path, {"seed": 1, "at": 8}, str(b.values), [0.0, 1.0], (x, y), model=exp.template)
    assert final.attrs["step_a"] == 16
    np.testing.assert_allclose(final.acc.values, ds.test_acc.sel(step=16, at=8, seed=[1, 2]).values, rtol=0, atol=1e-12)


def test_interpolate_refuses_bad_input_with_the_fix(spawned, experiment, tmp_path):
    exp, ds = spawned
    test = held_out()
    a, b = ds.learner.sel(seed=1, at=8), ds.learner.sel(seed=2, at=8)
    rows = [
        (dict(a="0123456789abcdef"), "No learner in the store .* has learner='0123456789abcdef'"),
        (dict(a={"seed": 7}), "No learner in the store .* has seed=7"),
        (dict(step=5), r"at steps \[8, 16\], not at step 5; ask for one of those, or keep more"),
        (dict(step=2.5), "step takes a kept step"),
        (dict(alphas=[[0, 1]]), "alphas takes a list of finite numbers"),
        (dict(alphas=[0, float("nan")]), "alphas takes a list of finite numbers"),
        (dict(data=None), "needs data to evaluate the path on"),
        (dict(a=ds.learner), "one value of its learner coordinate .* got 6 values"),
        (dict(a=3), "A learner is its id"),
        (dict(store=exp.store.path), "needs the experiment's model"),
        (dict(store=exp.store.path, model=MLP((8,))), "are not the stored learner's"),
    ]
    for change, message in rows:
        kwargs = {**dict(store=exp, a=a, b=b, alphas=[0, 1], data=test), **change}
        with pytest.raises(ValueError, match=message):
            interpolate(**kwargs)
    store = tmp_path / "two.zarr"
    wide, narrow = (experiment(model=MLP((w,)), store=store) for w in (32, 16))
    wide.run(), narrow.run()
    ids = [s.id for s in wide.grid.learners + narrow.grid.learners]
    different = r"different architectures .*params/1.weight: \(32, 40\) float32 against \(16, 40\) float32"
    with pytest.raises(ValueError, match=different):
        interpolate(store, *ids, [0, 1], test, model=MLP((32,)))
