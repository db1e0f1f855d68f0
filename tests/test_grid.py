"""The grid: learners, coordinates anyone can read, controls, ids that name what decides the numbers, and
random keys drawn from the learners' own coordinates."""

import numpy as np
import pytest
import torch

from serimats_func.interventions import (
    DataOrder,
    InitWeights,
    Intervention,
    Optimizer,
    PerturbActivations,
    PerturbGradients,
    PerturbHyperparameter,
    PerturbMomentum,
    PerturbWeights,
)
from serimats_func.models import MLP
from serimats_func.run.training import chunk_hooks, initial_state

CPU = torch.device("cpu")


def test_two_classes_that_share_an_axis_name_get_prefixed_coordinates(experiment):
    exp = experiment([InitWeights.make_variations(seed=range(2)), PerturbWeights.make_variations(epsilon=0.01, seed=range(3))])
    assert exp.grid.dims == {"init_seed": [0, 1], "perturb_seed": [0, 1, 2]}
    assert exp.grid.scalars == {"epsilon": 0.01}


def test_an_axis_made_from_a_lambda_is_labelled_by_the_relative_change_it_makes(experiment):
    exp = experiment([Optimizer.make_variations(momentum=(0.9, 0.99)),
                      PerturbMomentum.make_variations(momentum=lambda m: (m * (1 + e) for e in (0.001, -0.001, 0.1)),
                                                      when=((0, 4), (8, 12)))])
    assert exp.grid.dims == {"momentum": [0.9, 0.99], "momentum_change": [0.001, -0.001, 0.1], "when": ["0-4", "8-12"]}
    values = {(s.coords["momentum"], s.coords["momentum_change"]): s.interventions[1].values["momentum"]
              for s in exp.grid.learners}
    assert values[(0.99, -0.001)] == pytest.approx(0.99 * 0.999)


def test_a_lambda_that_adds_is_labelled_by_the_difference_and_any_other_by_position(experiment):
    added = experiment([Optimizer.make_variations(lr=(0.1, 0.2)),
                        PerturbHyperparameter.make_variations(lr=lambda lr: (lr + 0.05, lr + 0.5), when=(0, 4))])
    assert added.grid.dims["lr_delta"] == [0.05, 0.5]
    other = experiment([Optimizer.make_variations(lr=(0.1, 0.2)),
                        PerturbHyperparameter.make_variations(lr=lambda lr: (lr**2, 0.3), when=(0, 4))])
    assert other.grid.dims["lr_variant"] == [0, 1]


def test_one_class_given_an_axis_as_a_function_and_as_a_number_labels_both_on_one_coordinate(experiment):
    exp = experiment([Optimizer.make_variations(lr=(0.1, 0.2)),
                      PerturbHyperparameter.make_variations(lr=lambda lr: (lr * 2, lr * 0.5), when=(4, None)),
                      PerturbHyperparameter.make_variations(lr=0.05, when=(4, None))])
    assert exp.grid.dims == {"lr": [0.1, 0.2], "lr_change": [1.0, -0.5, -0.75]}  # 0.05 on 0.1 is its lr * 0.5
    values = {(s.coords["lr"], s.coords["lr_change"]): s.interventions[1].values["lr"] for s in exp.grid.learners}
    assert values == {(0.1, 1.0): 0.2, (0.1, -0.5): 0.05, (0.2, 1.0): 0.4, (0.2, -0.5): 0.1, (0.2, -0.75): 0.05}
    assert [len(exp.grid.learners), exp.run().train_loss.sizes["lr_change"]] == [5, 3]  # lr 0.05 once per base lr
    added = experiment([PerturbHyperparameter.make_variations(lr=lambda lr: lr + 0.04, when=(0, 4)),
                        PerturbHyperparameter.make_variations(momentum=0.5, when=(0, 4))],
                       optimizer=Optimizer(torch.optim.SGD, lr=0.01, momentum=0.9))
    assert [s.coords for s in added.grid.learners] == [{"lr_change": 4.0, "momentum": None, "when": "0-4"},
                                                       {"lr_change": None, "momentum": 0.5, "when": "0-4"}]


def test_windows_are_labelled_by_start_and_end(experiment):
    exp = experiment([PerturbGradients.make_variations(noise=0.01, when=((0, 100), (1000, None), ((5, 6), (9, 10))))],
                     steps=1001)  # every window starts within the run
    assert exp.grid.dims == {"when": ["0-100", "1000-", "5-6+9-10"]}


def test_each_learner_knows_its_control(experiment):
    exp = experiment([PerturbWeights.make_variations(epsilon=0, control=True),
                      PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=range(2)),
                      InitWeights.make_variations(seed=range(2))])
    for spec in exp.grid.learners:
        control = next(s for s in exp.grid.learners if s.id == spec.control_id)
        assert control.coords["init_seed"] == spec.coords["init_seed"] and control.coords["epsilon"] == 0
        assert control.control and (spec.control == (spec.id == control.id))
    ds = exp.run()
    for init_seed in (0, 1):
        cell = ds.sel(init_seed=init_seed, epsilon=0.1, perturb_seed=1)
        assert str(cell.control_learner.values) == str(ds.learner.sel(init_seed=init_seed, epsilon=0, perturb_seed=0).values)


def test_a_control_per_class_takes_the_control_variation_closest_to_the_learner(experiment):
    exp = experiment([PerturbWeights.make_variations(epsilon=0, seed=range(2), control=True),
                      PerturbGradients.make_variations(noise=0.0, control=True),
                      PerturbGradients.make_variations(noise=0.01, when=((0, 4), (4, 8)))])
    for spec in exp.grid.learners:
        control = next(s for s in exp.grid.learners if s.id == spec.control_id)
        assert control.interventions[1].values["noise"] == 0.0


def test_interventions_at_their_defaults_leave_ids_unchanged(experiment):
    plain = {s.coords.get("seed"): s.id for s in experiment([InitWeights.make_variations(seed=range(3))]).grid.learners}
    with_defaults = experiment([InitWeights.make_variations(seed=range(3)), PerturbGradients(noise=0.0, scale=1.0),
                                PerturbWeights(epsilon=0.0, seed=4, at=9), PerturbActivations(module="2", noise=0.0),
                                PerturbMomentum(momentum=lambda m: m, when=(0, 5)), DataOrder(seed=0)])
    assert {s.coords["init_seed"]: s.id for s in with_defaults.grid.learners} == plain


def test_a_class_that_did_not_exist_when_results_were_stored_renames_nothing(experiment):
    class NewInLibrary(Intervention):
        axes = {"strength": 0.0}

        def on_gradients(self, grads, n, ctx):
            return {k: g * (1 + n.strength) for k, g in grads.items()}

    before = [s.id for s in experiment([InitWeights.make_variations(seed=range(2))]).grid.learners]
    after = experiment([InitWeights.make_variations(seed=range(2)), NewInLibrary.make_variations(strength=(0.0, 0.5))])
    ids = {s.coords["strength"]: s.id for s in after.grid.learners if s.coords["seed"] == 0}
    assert ids[0.0] == before[0] and ids[0.5] not in before


def test_ids_name_what_decides_the_numbers(experiment):
    def ids(interventions=(), **kw):
        return [s.id for s in experiment(interventions, **kw).grid.learners]

    base = ids()
    assert ids(optimizer=Optimizer(torch.optim.SGD, lr=0.01, momentum=0.9)) == base  # the default, spelled out
    assert ids(steps=99) == base  # a trajectory's id does not depend on how long it is trained
    assert ids(optimizer=Optimizer(torch.optim.SGD, lr=0.02, momentum=0.9)) != base
    assert ids(batch_size=16) != base and ids(seed=1) != base and ids(dtype=torch.float64) != base
    # dampening is never read when momentum is 0
    assert ids(optimizer=Optimizer(torch.optim.SGD, lr=0.1, dampening=0.5)) == ids(optimizer=Optimizer(torch.optim.SGD, lr=0.1))
    # ... unless an intervention turns momentum on
    on = [PerturbMomentum.make_variations(momentum=0.9, when=(2, 4))]
    damped, plain = Optimizer(torch.optim.SGD, lr=0.1, dampening=0.5), Optimizer(torch.optim.SGD, lr=0.1)
    assert ids(on, optimizer=damped) != ids(on, optimizer=plain)


def test_duplicate_values_on_an_axis_are_refused():
    with pytest.raises(ValueError, match="axis 'epsilon' repeats the value 0.01; give each value once"):
        PerturbWeights.make_variations(epsilon=(0.01, 0.01))
    with pytest.raises(ValueError, match="axis 'seed' repeats the value 0"):
        InitWeights.make_variations(seed=(0, 0, 1))


def test_two_classes_that_seed_the_same_stream_are_refused(experiment):
    class MyInit(InitWeights):
        pass

    with pytest.raises(ValueError, match="MyInit and InitWeights both seed the 'init' random stream"):
        experiment([InitWeights.make_variations(seed=(0, 1)), MyInit.make_variations(seed=(2, 3))])


def test_a_hyperparameter_some_optimizers_lack_is_nan_for_them(experiment):
    exp = experiment([Optimizer.make_variations(optimizer=torch.optim.SGD, lr=0.1, momentum=(0.0, 0.9)),
                      Optimizer.make_variations(optimizer=torch.optim.Adam, lr=0.01)], steps=4)
    assert len({c.structure for c in exp.plan().chunks}) == 3  # SGD without momentum, SGD with, Adam
    ds = exp.run()
    assert ds.optimizer.values.tolist() == ["SGD", "Adam"]
    assert ds.momentum.values.tolist()[:2] == [0.0, 0.9] and np.isnan(ds.momentum.values[2])
    assert int(ds.train_loss.isel(step=-1).notnull().sum()) == 3


def test_a_perturbation_of_a_hyperparameter_the_optimizer_lacks_is_refused(experiment):
    with pytest.raises(ValueError, match="PerturbMomentum changes momentum, which torch.optim.Adam does not have"):
        experiment([PerturbMomentum.make_variations(momentum=0.5)], optimizer=torch.optim.Adam)


def test_perturbations_of_size_zero_are_one_learner_whatever_their_seed(experiment):
    exp = experiment([PerturbWeights.make_variations(epsilon=(0, 0.1), seed=range(3))], steps=4)
    assert len(exp.grid.learners) == 4
    ds = exp.run()
    assert ds.train_loss.sel(epsilon=0).notnull().all()  # the one learner fills all three cells
    assert len(set(ds.learner.sel(epsilon=0).values.tolist())) == 1


# -- random keys --------------------------------------------------------------------------------------------


def test_keys_depend_on_the_experiment_seed_and_the_learners_own_seeds(experiment):
    grid = [InitWeights.make_variations(seed=(0, 1)), DataOrder.make_variations(seed=(0, 1))]
    a, b = experiment(grid, seed=0).grid.learners, experiment(grid, seed=1).grid.learners
    assert len({s.init_key for s in a}) == 2 and len({s.data_key for s in a}) == 2
    assert len({s.dropout_key for s in a}) == 4
    assert {s.init_key for s in a}.isdisjoint({s.init_key for s in b})
    perturbed = experiment([PerturbWeights.make_variations(epsilon=0.1, seed=range(3))]).grid.learners
    assert len({s.init_key for s in perturbed}) == 1 and len({s.data_key for s in perturbed}) == 1


def test_init_seeds_whose_keys_share_their_low_32_bits_give_different_weights(experiment):
    exp = experiment([InitWeights.make_variations(seed=(27779, 51519))])
    a, b = exp.grid.learners
    assert a.init_key & 0xFFFFFFFF == b.init_key & 0xFFFFFFFF  # torch's CPU generator would see one seed
    params = initial_state(exp.grid.learners, chunk_hooks(exp.grid.learners), CPU).params
    assert not torch.equal(params["1.weight"][0], params["1.weight"][1])


def test_data_orders_differ_by_data_seed_and_are_shared_otherwise(experiment):
    exp = experiment([DataOrder.make_variations(seed=(0, 1)), PerturbWeights.make_variations(epsilon=0, control=True),
                      PerturbWeights.make_variations(epsilon=1e-5)], steps=8, log_every=1)
    ds = exp.run()
    loss = ds.train_loss
    assert dict(ds.test_acc.sizes) == {"seed": 2, "epsilon": 2, "step": 9}
    assert loss.sel(step=0, seed=0).values.tolist() == loss.sel(step=0, seed=1).values.tolist()  # same init
    assert not np.allclose(loss.sel(seed=0, epsilon=0).values[1:], loss.sel(seed=1, epsilon=0).values[1:])
    # a 1e-5 perturbation with the same data order stays close to its control
    np.testing.assert_allclose(loss.sel(seed=0, epsilon=1e-5).values, loss.sel(seed=0, epsilon=0).values, rtol=1e-4)


# -- perturbations do exactly what they say ------------------------------------------------------------------


def initial_params(exp):
    specs = exp.grid.learners
    return specs, initial_state(specs, chunk_hooks(specs), CPU).params


def test_relative_perturbation_moves_every_tensor_to_relative_distance_epsilon(experiment):
    specs, params = initial_params(experiment([PerturbWeights.make_variations(epsilon=(0, 0.001, 0.1), seed=3)],
                                              model=MLP(widths=(32, 16))))
    for i, spec in enumerate(specs):
        epsilon = spec.coords["epsilon"]
        for name, w in params.items():
            moved = (w[i] - w[0]).norm() / w[0].norm()
            assert moved.item() == pytest.approx(epsilon, rel=1e-4, abs=1e-7), name
    # one seed, one direction: the 0.1 move is the 0.001 move scaled by 100
    d_small, d_big = params["1.weight"][1] - params["1.weight"][0], params["1.weight"][2] - params["1.weight"][0]
    torch.testing.assert_close(d_big, 100 * d_small, rtol=1e-3, atol=1e-6)


def test_absolute_perturbation_adds_noise_of_standard_deviation_epsilon(experiment):
    _, params = initial_params(experiment([PerturbWeights.make_variations(epsilon=(0, 0.05), seed=1, mode="absolute")],
                                          model=MLP(widths=(1280,))))
    noise = params["1.weight"][1] - params["1.weight"][0]  # 51,200 draws
    assert noise.std().item() == pytest.approx(0.05, rel=0.02)
    assert noise.mean().abs().item() < 0.001


def test_a_perturbation_on_chosen_layers_leaves_the_others_alone(experiment):
    _, params = initial_params(experiment([PerturbWeights.make_variations(epsilon=(0, 0.1), layers="3*")]))
    assert torch.equal(params["1.weight"][0], params["1.weight"][1]) and torch.equal(params["1.bias"][0], params["1.bias"][1])
    assert not torch.equal(params["3.weight"][0], params["3.weight"][1])
    with pytest.raises(ValueError, match="layers='conv\\*' matches no parameter; the parameters are: 1.weight"):
        experiment([PerturbWeights.make_variations(epsilon=0.1, layers="conv*")])


def test_different_perturbation_seeds_give_different_directions(experiment):
    _, params = initial_params(experiment([PerturbWeights.make_variations(epsilon=0.1, seed=(1, 2))]))
    assert not torch.allclose(params["1.weight"][0], params["1.weight"][1])


def test_a_perturbation_below_what_the_dtype_carries_is_refused_and_float64_carries_it(experiment):
    with pytest.raises(ValueError, match=r"epsilon=1e-09 is below what torch.float32 can carry.*dtype=torch.float64"):
        experiment([PerturbWeights.make_variations(epsilon=(0, 1e-9))])
    with pytest.raises(ValueError, match=r"epsilon=1e-12 \(absolute\) is below what torch.float32 can carry"):
        experiment([PerturbWeights.make_variations(epsilon=1e-12, mode="absolute")])
    specs, params = initial_params(experiment([PerturbWeights.make_variations(epsilon=(0, 1e-9))], dtype=torch.float64))
    moved = (params["1.weight"][1] - params["1.weight"][0]).norm() / params["1.weight"][0].norm()
    assert moved.item() == pytest.approx(1e-9, rel=1e-6)
