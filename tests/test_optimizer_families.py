"""Every optimizer family in experiments: learner ids with defaults filled in, the store's coordinates, a grid
of several optimizers that gives each learner bitwise what it gets alone, and ``load_learner`` giving back the
torch.optim optimizer with its state, so that plain PyTorch goes on exactly like the library."""

import numpy as np
import pytest
import torch

from serimats_func.interventions import Optimizer, PerturbWeights
from serimats_func.optimizers import Lion, MuonWithAdamW, canonical, resolve
from tests.reference import assert_same_learner
from tests.test_store_lifecycle import go_on_with_torch

FAMILIES = [
    Optimizer(torch.optim.RMSprop, lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-3),
    Optimizer(torch.optim.Adagrad, lr=0.05, lr_decay=1e-2, initial_accumulator_value=0.1),
    Optimizer(torch.optim.Adamax, lr=2e-3, weight_decay=1e-3),
    Optimizer(torch.optim.NAdam, lr=2e-3, weight_decay=1e-2, decoupled_weight_decay=True),
    Optimizer(torch.optim.RAdam, lr=1e-3, weight_decay=1e-2),
    Optimizer(torch.optim.Adadelta, lr=0.5, weight_decay=1e-3),
    Optimizer(torch.optim.Adafactor, lr=1e-2, weight_decay=1e-2),
    Optimizer(torch.optim.Muon, lr=0.02, weight_decay=0.01),
    Optimizer(Lion, lr=3e-4, weight_decay=0.1),
]
GRID = [PerturbWeights.make_variations(epsilon=(0.0, 0.1), seed=1)]


@pytest.mark.parametrize("optimizer", FAMILIES, ids=lambda o: o.values["optimizer"].__name__)
def test_a_kept_state_loads_as_the_torch_optimizer_that_goes_on_exactly_like_the_library(experiment, optimizer):
    exp = experiment(GRID, optimizer=optimizer, dtype=torch.float64, steps=10, keep_states=[4])
    exp.run()
    spec = next(s for s in exp.grid.learners if s.coords == {"epsilon": 0.1, "seed": 1})
    module, opt = exp.load_learner(step=4, epsilon=0.1)
    torch_class = optimizer.values["optimizer"]
    assert type(opt) is (MuonWithAdamW if torch_class is torch.optim.Muon else torch_class) and len(opt.state) == 4
    go_on_with_torch(module, opt, spec, 4, 10)
    final, final_opt = exp.load_learner(epsilon=0.1)  # the final state, step 10
    assert_same_learner(module, opt, final, final_opt)


def test_a_grid_of_five_optimizers_is_one_result_and_each_learner_is_bitwise_itself_alone(experiment):
    grid = [Optimizer.make_variations(optimizers=(torch.optim.SGD, torch.optim.RMSprop, torch.optim.Adagrad,
                                                  torch.optim.NAdam, torch.optim.Muon), lr=(0.01, 0.1))]
    together = experiment(grid, steps=8, log_every=2)
    assert len(together.plan().chunks) == 5  # one group per optimizer class
    ds = together.run()
    assert dict(ds.sizes)["optimizer"] == 5 and set(ds.optimizer.values) == {"SGD", "RMSprop", "Adagrad", "NAdam", "Muon"}
    alone = experiment(grid, steps=8, log_every=2, max_learners_per_chunk=1).run()
    for metric in ("train_loss", "test_loss", "test_acc"):
        np.testing.assert_array_equal(ds[metric].values, alone[metric].values)
    single = experiment([Optimizer(torch.optim.RMSprop, lr=0.1)], steps=8, log_every=2).run()
    np.testing.assert_array_equal(ds.train_loss.sel(optimizer="RMSprop", lr=0.1).values, single.train_loss.values)
    assert len(np.unique(ds.train_loss.isel(step=-1))) == 10


def test_ids_hold_every_hyperparameter_with_its_default():
    assert canonical(torch.optim.RMSprop, resolve(torch.optim.RMSprop, {"lr": 0.01})) == {
        "optimizer": "RMSprop", "alpha": 0.99, "centered": False, "eps": 1e-08, "lr": 0.01, "momentum": 0.0,
        "weight_decay": 0.0}
    muon = canonical(torch.optim.Muon, resolve(torch.optim.Muon, {"lr": 0.02}))
    assert muon["ns_steps"] == 5 and muon["ns_coefficients"] == [3.4445, -4.775, 2.0315] and muon["adjust_lr_fn"] is None
    assert canonical(Lion, resolve(Lion, {"lr": 1e-4}))["betas"] == [0.9, 0.99]


def test_a_hyperparameter_some_optimizers_of_one_call_lack_is_refused():
    with pytest.raises(ValueError, match="centered"):
        Optimizer.make_variations(optimizers=(torch.optim.SGD, torch.optim.RMSprop), centered=True)
