"""Perturbations, initial weights and data orders come from keys, and do exactly what they say."""

import copy

import numpy as np
import pytest
import torch
from torch.func import vmap

from serimats_func import Experiment
from serimats_func.grid import build_grid
from serimats_func.interventions import DataOrder, InitWeights, Optimizer, PerturbWeights, perturb_weights
from serimats_func.keys import derive_key
from serimats_func.learners import initial_model_state, prepare_template
from serimats_func.models import MLP, Lenet5
from serimats_func.training import initial_state

SGD = Optimizer(torch.optim.SGD, lr=0.1)


def learners(interventions, seed=0):
    return build_grid(interventions, SGD, seed, setup={}).learners


@pytest.fixture(scope="module")
def template():
    return prepare_template(MLP(widths=(32, 16)), torch.zeros(2, 40))


def test_relative_perturbation_moves_every_tensor_to_relative_distance_epsilon(template):
    specs = learners([PerturbWeights.make_variations(epsilon=(0, 0.001, 0.1), seed=3)])
    state = initial_state(template, specs, torch.device("cpu"))["params"]
    for i, epsilon in enumerate([0.0, 0.001, 0.1]):
        for name, w in state.items():
            moved = (w[i] - w[0]).norm() / w[0].norm()
            assert moved.item() == pytest.approx(epsilon, rel=1e-5, abs=1e-7), name
    # one seed, one direction: the 0.1 move is the 0.001 move scaled by 100
    d_small, d_big = state["1.weight"][1] - state["1.weight"][0], state["1.weight"][2] - state["1.weight"][0]
    torch.testing.assert_close(d_big, 100 * d_small, rtol=1e-3, atol=1e-6)


def test_absolute_perturbation_adds_noise_of_standard_deviation_epsilon():
    template = prepare_template(MLP(widths=(256,)), torch.zeros(2, 200))
    specs = learners([PerturbWeights.make_variations(epsilon=(0, 0.05), seed=1, mode="absolute")])
    params = initial_state(template, specs, torch.device("cpu"))["params"]
    noise = params["1.weight"][1] - params["1.weight"][0]  # 51,200 draws
    assert noise.std().item() == pytest.approx(0.05, rel=0.02)
    assert noise.mean().abs().item() < 0.001


def test_perturb_weights_is_a_pure_function_that_vmaps_over_per_learner_values():
    w = {"a": torch.ones(3, 4)}
    d = {"a": torch.full((2, 3, 4), 2.0)}
    out = vmap(perturb_weights, in_dims=(None, 0, 0, 0))(w, d, torch.tensor([0.5, 0.5]), torch.tensor([True, False]))
    assert torch.allclose((out["a"][0] - 1).norm() / torch.ones(3, 4).norm(), torch.tensor(0.5))
    assert torch.allclose(out["a"][1], torch.full((3, 4), 2.0))  # absolute: 1 + 0.5 * 2


def test_different_perturbation_seeds_give_different_directions(template):
    specs = learners([PerturbWeights.make_variations(epsilon=0.1, seed=(1, 2))])
    p = initial_state(template, specs, torch.device("cpu"))["params"]["1.weight"]
    assert not torch.allclose(p[0], p[1])


def test_initial_weights_are_the_templates_own_initialization_drawn_from_the_init_key():
    model = Lenet5()
    template = prepare_template(model, torch.zeros(2, 1, 28, 28))
    key = derive_key(0, "init", 5)
    state = initial_model_state(template, key, dropout_key=0)
    torch.manual_seed(key)
    expected = copy.deepcopy(model)
    for m in expected.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for name, p in expected.named_parameters():
        torch.testing.assert_close(state["params"][name], p.detach(), rtol=0, atol=0)
    # PyTorch's default init: conv1 weights uniform in +-1/sqrt(fan_in)
    assert state["params"]["conv1.weight"].abs().max() <= 1 / 25**0.5


def test_the_library_never_touches_the_global_rng(small_mnist1d, tmp_path):
    train, test = small_mnist1d
    model = MLP(dropout=0.2)  # building a module draws from the global RNG; the library must not
    torch.manual_seed(42)
    before = torch.get_rng_state()
    Experiment(model, train, [InitWeights.make_variations(seed=range(3))], test_dataset=test, steps=4,
               store=tmp_path / "s.zarr", progress=False).run()
    assert torch.equal(torch.get_rng_state(), before)


def test_keys_depend_on_the_experiment_seed_and_the_learners_own_seeds():
    a = learners([InitWeights.make_variations(seed=(0, 1)), DataOrder.make_variations(seed=(0, 1))], seed=0)
    b = learners([InitWeights.make_variations(seed=(0, 1)), DataOrder.make_variations(seed=(0, 1))], seed=1)
    assert len({s.init_key for s in a}) == 2 and len({s.data_key for s in a}) == 2
    assert len({s.dropout_key for s in a}) == 4
    assert {s.init_key for s in a}.isdisjoint({s.init_key for s in b})
    perturbed = learners([PerturbWeights.make_variations(epsilon=0.1, seed=range(3))])
    assert len({s.init_key for s in perturbed}) == 1 and len({s.data_key for s in perturbed}) == 1


def test_data_orders_differ_by_data_seed_and_are_shared_otherwise(small_mnist1d, tmp_path):
    train, test = small_mnist1d
    exp = Experiment(MLP(widths=(16,)), train, [DataOrder.make_variations(seed=(0, 1)),
                                                PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
                                                PerturbWeights.make_variations(epsilon=1e-9, seed=0)],
                     test_dataset=test, steps=8, log_every=1, store=tmp_path / "s.zarr", progress=False)
    ds = exp.run()
    loss = ds.train_loss
    assert dict(ds.sizes) == {"data_seed": 2, "epsilon": 2, "step": 9} and int(ds.perturb_seed) == 0
    assert loss.sel(step=0, data_seed=0).values.tolist() == loss.sel(step=0, data_seed=1).values.tolist()  # same init
    assert not np.allclose(loss.sel(data_seed=0, epsilon=0).values[1:], loss.sel(data_seed=1, epsilon=0).values[1:])
    # a 1e-9 perturbation with the same data order stays within rounding of its control
    np.testing.assert_allclose(loss.sel(data_seed=0, epsilon=1e-9).values, loss.sel(data_seed=0, epsilon=0).values,
                               rtol=1e-5)


def test_two_classes_that_share_an_axis_name_get_prefixed_coordinates(small_mnist1d, tmp_path):
    train, _ = small_mnist1d
    exp = Experiment(MLP(), train, [InitWeights.make_variations(seed=range(2)),
                                    PerturbWeights.make_variations(epsilon=0.01, seed=range(3))], store=tmp_path / "s.zarr")
    assert exp.grid.dims == {"init_seed": [0, 1], "perturb_seed": [0, 1, 2]}
    assert exp.grid.scalars == {"epsilon": 0.01}


def test_a_hyperparameter_some_optimizers_lack_is_nan_for_them(small_mnist1d, tmp_path):
    train, test = small_mnist1d
    exp = Experiment(MLP(widths=(16,)), train, [
        Optimizer.make_variations(optimizer=torch.optim.SGD, lr=0.1, momentum=(0.0, 0.9)),
        Optimizer.make_variations(optimizer=torch.optim.Adam, lr=0.01),
    ], test_dataset=test, steps=4, store=tmp_path / "s.zarr", progress=False)
    ds = exp.run()
    assert ds.optimizer.values.tolist() == ["SGD", "Adam"]
    assert ds.momentum.values.tolist()[:2] == [0.0, 0.9] and np.isnan(ds.momentum.values[2])
    assert int(ds.train_loss.isel(step=-1).notnull().sum()) == 3
    assert len({c.structure for c in Experiment(MLP(widths=(16,)), train, exp.interventions, store=tmp_path / "t.zarr")
                .plan().chunks}) == 3  # SGD without momentum, SGD with, Adam


def test_perturbations_of_size_zero_are_one_learner_whatever_their_seed(small_mnist1d, tmp_path):
    train, test = small_mnist1d
    exp = Experiment(MLP(widths=(16,)), train, [PerturbWeights.make_variations(epsilon=(0, 0.1), seed=range(3))],
                     test_dataset=test, steps=4, store=tmp_path / "s.zarr", progress=False)
    assert len(exp.grid.learners) == 4
    ds = exp.run()
    assert ds.train_loss.sel(epsilon=0).notnull().all()  # the one learner fills all three cells
    assert len(set(ds.learner.sel(epsilon=0).values.tolist())) == 1
