"""A learner whose training loss becomes non-finite is marked, its metrics are NaN from then on (not
plausible numbers such as the accuracy of argmax over NaN logits), and its batch-mates are untouched."""

import numpy as np
import pytest
import torch

from serimats_func.core.evaluation import evaluate_dataset
from serimats_func.interventions import InitWeights, Optimizer, PerturbHyperparameter

METRICS = ["train_loss", "train_acc", "test_loss", "test_acc"]
SEEDS = InitWeights.make_variations(seed=range(2))


def test_a_learner_with_lr_1e4_is_marked_and_its_metrics_are_nan_from_then_on(experiment):
    exp = experiment([SEEDS, Optimizer.make_variations(lr=(0.01, 1e4))], log_every=1)
    assert [len(c.learners) for c in exp.plan().chunks] == [4]  # all four train together
    ds = exp.run()
    blown, healthy = ds.sel(lr=1e4), ds.sel(lr=0.01)
    assert healthy.diverged_at.isnull().all()
    assert all(np.isfinite(healthy[m]).all() for m in METRICS)
    for seed in (0, 1):
        at = float(blown.diverged_at.sel(seed=seed))
        assert 0 <= at < 16 and at == int(at)
        learner = blown.sel(seed=seed)
        assert all(np.isfinite(learner[m].sel(step=0)) for m in METRICS)  # it started healthy
        for m in METRICS:  # from the step diverged_at itself, as the README says (its state is the diverged one)
            assert learner[m].sel(step=slice(at, None)).isnull().all(), m
            assert np.isfinite(learner[m].sel(step=at - 1)), m
        assert np.isnan(learner.train_acc.sel(step=16))  # not the 0.1 of argmax over NaN logits


def test_a_diverging_learner_leaves_its_batch_mates_bitwise_unchanged(experiment):
    together = experiment([SEEDS, Optimizer.make_variations(lr=(0.01, 1e4))], log_every=4).run()
    alone = experiment([SEEDS, Optimizer.make_variations(lr=0.01)], log_every=4).run()
    for m in METRICS:
        np.testing.assert_array_equal(together[m].sel(lr=0.01).values, alone[m].values)
    assert together.diverged_at.sel(lr=1e4).notnull().all()


def test_a_learning_rate_that_blows_up_inside_a_window_marks_a_step_in_the_window(experiment):
    ds = experiment([PerturbHyperparameter.make_variations(lr=(0.01, 1e4), when=(6, 16))], log_every=1).run()
    assert np.isnan(ds.diverged_at.sel(lr=0.01))
    at = float(ds.diverged_at.sel(lr=1e4))
    assert 7 <= at < 16  # the first update with lr=1e4 is step 6: the loss before it was finite
    assert all(np.isfinite(ds[m].sel(lr=1e4, step=6)) for m in METRICS)
    assert ds.train_loss.sel(lr=1e4, step=slice(at, None)).isnull().all()


def test_metrics_are_nan_from_diverged_at_when_a_longer_run_finds_the_divergence_of_a_stored_step(experiment, store):
    """A run that ends at step ``at`` stores finite numbers there (the loss of that state is first computed by the
    next update); asking for more steps finds the divergence, and the result is NaN from ``at`` on all the same."""
    grid = [Optimizer.make_variations(lr=(0.01, 1e4))]
    at = int(experiment(grid, log_every=1).run().diverged_at.sel(lr=1e4))
    assert at >= 2
    short = experiment(grid, log_every=1, steps=at, store=store).run()
    assert np.isfinite(short.param_norm.sel(lr=1e4, step=at))  # its divergence is not known yet
    longer = experiment(grid, log_every=1, store=store)
    assert [len(c.learners) for c in longer.plan().chunks] == [2]  # continued from their stored states
    ds = longer.run()
    assert int(ds.diverged_at.sel(lr=1e4)) == at
    for m in [*METRICS, "param_norm"]:
        assert ds[m].sel(lr=1e4, step=slice(at, None)).isnull().all(), m
        assert np.isfinite(ds[m].sel(lr=1e4, step=at - 1)), m


def test_metrics_against_a_control_are_nan_from_the_step_its_control_diverged():
    from serimats_func.run.recording import nan_from_divergence

    values = np.arange(8.0).reshape(2, 4)  # learner 1's control is learner 0, which diverged at step 5
    out = nan_from_divergence({"control_distance": values, "param_norm": values}, [0, 4, 5, 8], np.array([5, -1]),
                              control=np.array([0, 0]), against={"control_distance"})
    assert np.isnan(out["control_distance"]).tolist() == [[False, False, True, True]] * 2
    assert np.isnan(out["param_norm"]).tolist() == [[False, False, True, True], [False] * 4]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_accuracy_of_non_finite_logits_is_nan_and_the_other_learners_are_exact(bad):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 20, 4, generator=gen)  # (N, B, C)
    logits[1, 5, 2] = bad
    y = torch.randint(0, 4, (20,), generator=gen)
    loss, acc = evaluate_dataset(lambda p, b, x: logits[:, x], torch.nn.functional.cross_entropy, None, None,
                                 torch.arange(20), y, batch_size=7)
    assert np.isnan(acc[1].item())
    for i in (0, 2):
        assert acc[i].item() == (logits[i].argmax(-1) == y).double().mean().item()
        assert loss[i].item() == pytest.approx(torch.nn.functional.cross_entropy(logits[i], y).item(), rel=1e-6)
