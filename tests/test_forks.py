"""Forks: learners that share a prefix train it once, and each forked learner is bitwise itself trained alone."""

import numpy as np
import pytest

from serimats_func.interventions import DataOrder, InitWeights, PerturbMomentum, PerturbWeights
from serimats_func.models import MLP

METRICS = ["train_loss", "train_acc", "test_loss", "test_acc"]


def spawn_grid(seeds, at):
    return [DataOrder.make_variations(seed=0, control=True), DataOrder.make_variations(seed=seeds, at=at)]


def test_children_of_a_control_fork_from_its_state_and_each_is_bitwise_itself_alone(experiment):
    exp = experiment(spawn_grid(range(1, 9), 20), model=MLP(widths=(64, 64)), steps=24, log_every=4)
    plan = exp.plan()
    assert plan.learner_steps == 20 + 9 * 4  # the prefix once, then the control and its 8 children
    assert "fork: 8 learner(s) fork at step 20 from the grid learner" in str(plan)
    ds = exp.run()
    for seed in (1, 5, 8):
        alone = experiment([DataOrder(seed=seed, at=20)], model=MLP(widths=(64, 64)), steps=24, log_every=4,
                           fork=False).run()
        for metric in METRICS:
            np.testing.assert_array_equal(ds[metric].sel(seed=seed, at=20).values, alone[metric].values)
    control = ds.train_loss.sel(seed=0, at=0)
    children = ds.train_loss.sel(at=20).drop_sel(seed=0)
    assert (children.sel(step=slice(0, 20)) == control.sel(step=slice(0, 20))).all()  # copied from the prefix
    assert len(np.unique(children.sel(step=24).values)) == 8  # and they do differ after it


def test_fork_false_trains_every_learner_from_step_0_with_the_same_numbers(experiment):
    grid = spawn_grid((1, 2), 8)
    forked = experiment(grid, steps=12, log_every=2)
    plain = experiment(grid, steps=12, log_every=2, fork=False)
    assert (forked.plan().learner_steps, plain.plan().learner_steps) == (8 + 3 * 4, 3 * 12)
    a, b = forked.run(), plain.run()
    for metric in [*METRICS, "control_distance"]:
        np.testing.assert_array_equal(a[metric].values, b[metric].values)


def test_a_data_order_at_0_is_the_data_order_it_always_was():
    assert DataOrder(seed=3, at=0).identity() == DataOrder(seed=3).identity() == {"seed": 3}
    assert DataOrder(seed=3, at=5).identity() == {"seed": 3, "at": 5}
    assert DataOrder(seed=3, at=5).first_active_step() == 5


def test_perturb_weights_at_k_forks_at_k_minus_1_bitwise(experiment):
    grid = [PerturbWeights.make_variations(epsilon=0, control=True),
            PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=(0, 1), at=(6, 10))]
    forked = experiment(grid, steps=12, log_every=1)
    plan = forked.plan()
    # control: 0-5, 5-9, 9-12; at=6 learners: 5-12; at=10 learners: 9-12
    assert plan.learner_steps == 5 + 5 * 4 + 9 * 3
    a = forked.run()
    b = experiment(grid, steps=12, log_every=1, fork=False, max_learners_per_chunk=2).run()
    for metric in [*METRICS, "control_distance", "control_agreement"]:
        np.testing.assert_array_equal(a[metric].values, b[metric].values)


def test_momentum_windows_fork_from_a_prefix_not_in_the_grid(experiment):
    grid = [InitWeights.make_variations(seed=(0, 1)),
            PerturbMomentum.make_variations(momentum=lambda m: (m * 1.05, m * 0.95), when=((0, 3), (6, 9), (10, 12)))]
    forked = experiment(grid, steps=14, log_every=1)
    plan = forked.plan()
    # per init seed: a prefix 0-10 (forks at 6 and 10), 2 learners 6-14, 2 learners 10-14, 2 learners 0-14
    assert plan.learner_steps == 2 * (10 + 2 * 8 + 2 * 4 + 2 * 14)
    assert "from 2 prefixes not in the grid (trained here)" in str(plan)
    a = forked.run()
    b = experiment(grid, steps=14, log_every=1, fork=False).run()
    for metric in METRICS:
        np.testing.assert_array_equal(a[metric].values, b[metric].values)
    assert experiment(grid, steps=14, log_every=1, store=forked.store.path).plan().to_train == 0


def test_every_built_in_that_acts_in_time_says_from_which_step_so_that_it_forks():
    import torch

    from serimats_func.interventions import (
        Augment,
        ClipGradients,
        DropoutMasks,
        LRSchedule,
        PerturbActivations,
        PerturbGradients,
        PerturbHyperparameter,
        ResetOptimizerState,
    )

    late = {  # each variation acts from update 7 on (PerturbWeights: at the end of update 7, after 6 updates)
        DataOrder(seed=1, at=7): 7, DropoutMasks(seed=1, at=7): 7, PerturbWeights(epsilon=0.1, at=7): 6,
        PerturbMomentum(momentum=0.5, when=(7, 9)): 7, PerturbHyperparameter(lr=0.5, when=(7, None)): 7,
        PerturbGradients(noise=0.1, when=(7, 9)): 7, ClipGradients(max_norm=0.1, when=(7, None)): 7,
        ResetOptimizerState(at=7): 7, ResetOptimizerState(when=((9, 10), (7, 8))): 7,
        Augment(noise=0.1, when=(7, None)): 7, PerturbActivations(module="1", noise=0.1, when=(7, 9)): 7,
    }
    for v, step in late.items():
        assert v.first_active_step() == step, v
    # LRSchedule acts at every step, from the first (a schedule that starts later is its own scheduler, warmup=)
    assert LRSchedule(torch.optim.lr_scheduler.StepLR, step_size=5).first_active_step() == 0


@pytest.mark.parametrize("late", ["augment", "clip"])
def test_augmentation_and_clipping_from_step_k_fork_there_bitwise(experiment, late):
    from serimats_func.interventions import Augment, ClipGradients

    grid = ([Augment.make_variations(noise=(0.0, 0.3, 1.0), when=(6, None))] if late == "augment" else
            [ClipGradients.make_variations(max_norm=(float("inf"), 0.01, 0.001), when=(6, None))])
    forked = experiment(grid, steps=12, log_every=1)
    assert forked.plan().learner_steps == 6 + 3 * 6  # the learner without it (the first variation) up to 6, then 3
    a = forked.run()
    b = experiment(grid, steps=12, log_every=1, fork=False).run()
    for metric in METRICS:
        np.testing.assert_array_equal(a[metric].values, b[metric].values)
    loss = a.train_loss.values  # (3, 13): equal after 0..6 updates, different after
    assert (loss[1:, :7] == loss[0, :7]).all() and (loss[1:, 7:] != loss[0, 7:]).all()


def test_a_rerun_that_adds_children_trains_only_their_suffixes(experiment, tmp_path):
    store = tmp_path / "spawn.zarr"
    first = experiment(spawn_grid((1, 2), 8), steps=12, log_every=2, store=store)
    first.run()
    more = experiment(spawn_grid((1, 2, 3, 4), 8), steps=12, log_every=2, store=store)
    plan = more.plan()
    assert (plan.in_store, plan.to_train) == (3, 2)
    assert plan.learner_steps == 3 * 4  # two children and their control beside them (not written again), 8 to 12
    assert "from the grid learner {'seed': 0, 'at': 0} (stored)" in str(plan)
    ds = more.run()
    alone = experiment([DataOrder(seed=4, at=8)], steps=12, log_every=2, fork=False).run()
    for metric in METRICS:
        np.testing.assert_array_equal(ds[metric].sel(seed=4, at=8).values, alone[metric].values)
    every = experiment(spawn_grid((1, 2, 3, 4), 8), steps=12, log_every=2, fork=False).run()
    for metric in [*METRICS, "control_distance"]:
        np.testing.assert_array_equal(ds[metric].values, every[metric].values)


@pytest.mark.parametrize("at", [5, 8, 13])
def test_a_late_data_order_shows_every_example_once_per_epoch(at):
    import torch

    from serimats_func.core.data import DataStream, epoch_order, stream_order

    n, spe, b = 40, 4, 10
    stream = DataStream(key=7, base=1, at=at)
    for epoch in range(4):
        order = stream_order(stream, epoch, n, spe, b)
        assert sorted(order.tolist()) == list(range(n))
        if (epoch + 1) * spe <= at:
            assert torch.equal(order, epoch_order(1, epoch, n))
        elif epoch * spe >= at:
            assert torch.equal(order, epoch_order(7, epoch, n))
        else:
            seen = (at - epoch * spe) * b
            assert torch.equal(order[:seen], epoch_order(1, epoch, n)[:seen])


def test_a_window_whose_value_is_the_optimizers_own_is_no_fork_and_no_loop(experiment):
    from serimats_func.interventions import PerturbHyperparameter

    exp = experiment([PerturbHyperparameter.make_variations(lr=(0.01, 0.5), when=(6, 16))], log_every=1)
    plan = exp.plan()  # lr=0.01 is SGD's own: that learner is its own prefix, the lr=0.5 one forks from it
    assert plan.learner_steps == 6 + 2 * 10
    a = exp.run()
    b = experiment([PerturbHyperparameter.make_variations(lr=(0.01, 0.5), when=(6, 16))], log_every=1, fork=False).run()
    np.testing.assert_array_equal(a.train_loss.values, b.train_loss.values)


@pytest.mark.parametrize("keep_every", [None, 4])
def test_children_added_to_a_control_stored_without_their_fork_state_fork_from_it(experiment, tmp_path, keep_every):
    """A control trained alone, children at step 10 asked for later: the control trains again up to 10 once (from
    its latest kept state), the children fork there with the control beside them, and every number, the metrics
    against the control included, is that of the same grid trained without forks. Its state at 10 is kept, so a
    third run with more children trains only their suffixes."""
    store = tmp_path / "late.zarr"
    experiment([DataOrder.make_variations(seed=0, control=True)], steps=12, log_every=2, store=store, keep_every=keep_every).run()
    more = experiment(spawn_grid((1, 2), 10), steps=12, log_every=2, store=store)
    plan = more.plan()
    start = 8 if keep_every else 0
    assert (plan.in_store, plan.to_train) == (1, 2)
    assert plan.learner_steps == (10 - start) + 3 * 2  # the control up to 10 once, then beside its two children
    assert "(stored; trained again up to step 10 for its state there)" in str(plan)
    ds = more.run()
    every = experiment(spawn_grid((1, 2), 10), steps=12, log_every=2, fork=False).run()
    for metric in [*METRICS, "control_distance", "control_agreement"]:
        np.testing.assert_array_equal(ds[metric].values, every[metric].values)
    third = experiment(spawn_grid((1, 2, 3), 10), steps=12, log_every=2, store=store)
    assert third.plan().learner_steps == 2 * 2  # the new child and its control beside it, from the kept state at 10
