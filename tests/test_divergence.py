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
        for m in METRICS:
            assert learner[m].sel(step=slice(at + 1, None)).isnull().all(), m
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
    assert ds.train_loss.sel(lr=1e4, step=slice(at + 1, None)).isnull().all()


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
