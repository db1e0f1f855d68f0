"""The user's first two examples, as written (serimats_func imports, MNIST IDX data)."""

import numpy as np
import torch

from serimats_func import datasets
from serimats_func.experiments import Experiment
from serimats_func.interventions import InitWeightsIntervention, OptimizerIntervention, PerturbWeights
from serimats_func.models import Lenet5


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

    assert dict(ds.sizes) == {"epsilon": 4, "seed": 10, "step": 2}  # step 0 and the end of the one epoch (2 steps)
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
