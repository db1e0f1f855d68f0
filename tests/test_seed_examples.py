"""The user's first two examples, as written (serimats_func imports, MNIST IDX data)."""

import numpy as np
import torch

from serimats_func import datasets
from serimats_func.experiments import Experiment
from serimats_func.interventions import (
    InitWeightsIntervention,
    OptimizerIntervention,
    PerturbMomentumIntervention,
    PerturbWeights,
)
from serimats_func.models import Lenet5
from tests import store_paths


def test_first_example_perturbation_at_init_gives_31_labelled_learners(mnist_root, store):
    dataset = datasets.mnist(mnist_root, train=True)

    exp = Experiment(
        model=Lenet5(),
        dataset=dataset,
        interventions=[
            PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
            PerturbWeights.make_variations(epsilon=(0.001, 0.01, 0.1), seed=range(10)),
        ],
        store=store,
        progress=False,
    )
    ds = exp.run()

    assert dict(ds.train_loss.sizes) == {"epsilon": 4, "seed": 10, "step": 2}  # step 0 and the end of the one epoch (2 steps)
    assert ds.epsilon.values.tolist() == [0.0, 0.001, 0.01, 0.1]
    trained = ~np.isnan(ds.train_loss.isel(step=-1).values)
    assert trained.sum() == 31
    assert trained[0].tolist() == [True] + [False] * 9  # only the control at epsilon=0
    assert ds.control.sel(epsilon=0, seed=0) and int(ds.control.sum()) == 1
    assert np.isnan(ds.test_loss).all()  # no test_dataset given: test metrics are not invented
    # every perturbed learner starts elsewhere than the control, by more for larger epsilon
    start = ds.train_loss.sel(step=0)
    gap = abs(start - start.sel(epsilon=0, seed=0)).mean("seed")
    assert 0 < gap.sel(epsilon=0.001) < gap.sel(epsilon=0.1)


def test_second_example_optimizers_and_learning_rates_gives_60_learners(mnist_root, store):
    dataset = datasets.mnist(mnist_root, train=True)

    exp = Experiment(
        model=Lenet5(),
        dataset=dataset,
        interventions=[
            InitWeightsIntervention.make_variations(seed=range(10)),
            OptimizerIntervention.make_variations(
                optimizers=(torch.optim.SGD, torch.optim.Adam),
                lr=(0.001, 0.01, 0.1),
            ),
        ],
        test_dataset=datasets.mnist(mnist_root, train=False),
        store=store,
        progress=False,
    )
    plan = exp.plan()
    assert plan.to_train == 60 and len({c.structure for c in plan.chunks}) == 2  # SGD and Adam groups
    ds = exp.run()

    assert dict(ds.sizes) == {"seed": 10, "optimizer": 2, "lr": 3, "step": 2}
    assert ds.optimizer.values.tolist() == ["SGD", "Adam"]
    assert ds.lr.values.tolist() == [0.001, 0.01, 0.1]
    assert not np.isnan(ds.test_acc).any()
    final = ds.train_loss.isel(step=-1)
    # Adam at lr 0.1 and SGD at lr 0.001 behave very differently: the grid is not one learner copied
    assert float(abs(final.sel(optimizer="Adam", lr=0.1) - final.sel(optimizer="SGD", lr=0.001)).mean()) > 0.05
    # different init seeds give different starting losses
    assert len(np.unique(ds.train_loss.sel(step=0, optimizer="SGD", lr=0.01).values)) == 10


def test_second_example_with_sgd_adam_rmsprop_and_muon_gives_one_result(mnist_root, store):
    """The second example with four optimizers (two init seeds to keep it small): one result, one group per class;
    Muon trains LeNet-5's linear matrices, AdamW its convolution kernels and biases."""
    exp = Experiment(
        model=Lenet5(),
        dataset=datasets.mnist(mnist_root, train=True),
        interventions=[
            InitWeightsIntervention.make_variations(seed=range(2)),
            OptimizerIntervention.make_variations(
                optimizers=(torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop, torch.optim.Muon),
                lr=(0.001, 0.01, 0.1),
            ),
        ],
        test_dataset=datasets.mnist(mnist_root, train=False),
        store=store,
        progress=False,
    )
    plan = exp.plan()
    assert plan.to_train == 24 and len({c.structure for c in plan.chunks}) == 4
    ds = exp.run()

    assert dict(ds.sizes) == {"seed": 2, "optimizer": 4, "lr": 3, "step": 2}
    assert ds.optimizer.values.tolist() == ["SGD", "Adam", "RMSprop", "Muon"]
    assert not np.isnan(ds.test_acc).any()
    final = ds.train_loss.isel(step=-1)
    assert len(np.unique(final.values)) == 24  # every optimizer, rate and seed trains differently


def test_third_example_momentum_windows_gives_540_learners_and_54_without_init_weights(mnist_digits, tmp_path):
    """The seed's third example as written (the lambda, the windows), scaled down: 32 MNIST digits, batch 16,
    3 steps, windows one step long."""
    x, y = mnist_digits
    dataset = (x[:32], y[:32])
    store = tmp_path / "momentum.zarr"

    def third_example(with_init_weights: bool) -> Experiment:
        interventions = [
            OptimizerIntervention.make_variations(
                momentum=(0.9, 0.99, 0.999),
            ),
            PerturbMomentumIntervention.make_variations(
                momentum=lambda m: (m * (1 + epsilon) for epsilon in (0.001, -0.001, 0.01, -0.01, 0.1, -0.1)),
                when=((0, 1), (1, 2), (2, 3)),
            ),
        ]
        if with_init_weights:
            interventions.insert(0, InitWeightsIntervention.make_variations(seed=range(10)))
        return Experiment(model=Lenet5(), dataset=dataset, interventions=interventions, batch_size=16, steps=3,
                          store=store, progress=False)

    small = third_example(False)
    assert small.plan().to_train == 54
    ds = small.run()
    assert dict(ds.sizes) == {"momentum": 3, "momentum_change": 6, "when": 3, "step": 3}  # 0, epoch end, last
    assert ds.momentum_change.values.tolist() == [0.001, -0.001, 0.01, -0.01, 0.1, -0.1]
    assert ds.when.values.tolist() == ["0-1", "1-2", "2-3"]
    assert ds.train_loss.notnull().all()
    final = ds.train_loss.isel(step=-1)
    # momentum at step 0 changes nothing (torch starts the buffer at the gradient); in later windows every change acts
    assert (final.sel(when="0-1") == final.sel(when="0-1", momentum_change=0.001)).all()
    assert all(len(np.unique(final.sel(when="1-2", momentum=m))) == 6 for m in (0.9, 0.99, 0.999))

    full = third_example(True)
    plan = full.plan()
    assert (plan.in_store, plan.to_train) == (54, 486)  # init seed 0 is the default: those 54 are reused
    big = full.run()
    assert dict(big.sizes) == {"seed": 10, "momentum": 3, "momentum_change": 6, "when": 3, "step": 3}
    assert int(big.train_loss.isel(step=-1).notnull().sum()) == 540
    np.testing.assert_array_equal(big.train_loss.sel(seed=0).values, ds.train_loss.values)


def test_third_example_without_init_weights_then_with_two_init_seeds_reuses_the_54_unchanged(mnist_digits, tmp_path):
    """The seed's story: validate 54 learners for one weight initialization, then add InitWeights back with
    seed=range(2): the store serves the 54 (init seed 0 is the default) and only the other 54 train."""
    x, y = mnist_digits
    store = tmp_path / "story.zarr"

    def third_example(init_seeds: range | None) -> Experiment:
        interventions = [
            OptimizerIntervention.make_variations(momentum=(0.9, 0.99, 0.999)),
            PerturbMomentumIntervention.make_variations(
                momentum=lambda m: (m * (1 + epsilon) for epsilon in (0.001, -0.001, 0.01, -0.01, 0.1, -0.1)),
                when=((0, 1), (1, 2), (2, 3)),
            ),
        ]
        if init_seeds is not None:
            interventions.insert(0, InitWeightsIntervention.make_variations(seed=init_seeds))
        return Experiment(model=Lenet5(), dataset=(x[:32], y[:32]), interventions=interventions, batch_size=16, steps=3,
                          store=store, progress=False)

    first = third_example(None)
    assert first.plan().to_train == 54
    validated = first.run()
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file() and store_paths.claims(store) not in p.parents}

    plan = third_example(range(2)).plan()
    assert (plan.learners, plan.in_store, plan.to_train) == (108, 54, 54)
    assert "108 learners in the grid (108 cells); 54 already in" in str(plan)
    both = third_example(range(2)).run()
    np.testing.assert_array_equal(both.train_loss.sel(seed=0).values, validated.train_loss.values)
    assert int(both.train_loss.isel(step=-1).notnull().sum()) == 108
    assert not np.array_equal(both.train_loss.sel(seed=1).values, validated.train_loss.values)
    assert all(p.read_bytes() == data for p, data in before.items())  # nothing stored before was touched
