"""Parameter groups: other hyperparameters, or another optimizer, for the parameters a glob matches.

Each grouped optimizer against torch.optim with the same param groups (float64, 200 steps, 1e-10), written out
by hand here: one torch.optim optimizer with several param groups, or two torch optimizers (Muon on the matrices
and AdamW on the biases) for a mixed case. Then in experiments: a grid over a group's hyperparameters is one
vmapped group whose learners are each bitwise themselves alone, groups are part of learner ids, and
``load_learner`` gives back torch.optim with the same param groups and state, so that plain PyTorch goes on
exactly like the library.
"""

import numpy as np
import pytest
import torch
from torch.func import grad

from serimats_func.interventions import Optimizer, PerturbWeights
from serimats_func.optimizers import CombinedOptimizer, ParamGroup, grouped_twin
from tests.reference import assert_same_learner
from tests.test_optimizers import TRAJECTORY_STEPS, _problem
from tests.test_store_lifecycle import go_on_with_torch

MATRICES = ["1.weight", "3.weight", "5.weight"]
BIASES = ["1.bias", "3.bias", "5.bias"]


def _sgd_groups(named):
    """SGD with three param groups: the rest, the biases (their own lr, no weight decay), the last layer's weight."""
    return torch.optim.SGD([{"params": [named["1.weight"], named["3.weight"]]},
                            {"params": [named[n] for n in BIASES], "lr": 0.01, "weight_decay": 0.0},
                            {"params": [named["5.weight"]], "momentum": 0.5, "nesterov": True, "dampening": 0.0}],
                           lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=False)


def _adam_groups(named):
    return torch.optim.Adam([{"params": [named[n] for n in named if not n.startswith("5.")]},
                             {"params": [named["5.weight"], named["5.bias"]], "lr": 1e-2, "betas": (0.8, 0.99),
                              "amsgrad": True}], lr=1e-3, foreach=False)


def _muon_and_adamw(named):
    """Muon on the matrices and AdamW on the biases: two torch optimizers, stepped one after the other."""
    return [torch.optim.Muon([named[n] for n in MATRICES], lr=0.02),
            torch.optim.AdamW([named[n] for n in BIASES], lr=3e-3, weight_decay=0.0, foreach=False)]


def _sgd_and_adam(named):
    return [torch.optim.SGD([named[n] for n in named if not n.startswith("3.")], lr=0.05, momentum=0.9, foreach=False),
            torch.optim.Adam([{"params": [named["3.weight"]]}, {"params": [named["3.bias"]], "lr": 1e-2}], lr=1e-3,
                             foreach=False)]


CASES = {
    "SGD-three-groups": (Optimizer(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-3, param_groups={
        "*.bias": dict(lr=0.01, weight_decay=0.0), "5.*": dict(momentum=0.5, nesterov=True)}), _sgd_groups),
    "Adam-amsgrad-group": (Optimizer(torch.optim.Adam, lr=1e-3, param_groups={
        "5.*": dict(lr=1e-2, betas=(0.8, 0.99), amsgrad=True)}), _adam_groups),
    "Muon-with-AdamW-biases": (Optimizer(torch.optim.Muon, lr=0.02, param_groups={
        "*.bias": Optimizer(torch.optim.AdamW, lr=3e-3, weight_decay=0.0)}), _muon_and_adamw),
    "SGD-with-Adam-groups": (Optimizer(torch.optim.SGD, lr=0.05, momentum=0.9, param_groups={
        "3.weight": Optimizer(torch.optim.Adam, lr=1e-3), "3.bias": Optimizer(torch.optim.Adam, lr=1e-2)}),
        _sgd_and_adam),
}


def _parts(optimizer: Optimizer):
    """The main optimizer and the groups of an Optimizer standing alone (as an experiment's optimizer=)."""
    return ParamGroup("", *optimizer.resolve_with(optimizer)), optimizer.groups_with(optimizer)


@pytest.mark.parametrize("case", CASES)
def test_a_grouped_optimizer_follows_torch_with_the_same_param_groups_to_1e_10_over_200_steps(case):
    optimizer, reference = CASES[case]
    model, loss_of, batch = _problem(torch.float64)
    theirs = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    torch_optimizers = reference(theirs)
    torch_optimizers = torch_optimizers if isinstance(torch_optimizers, list) else [torch_optimizers]
    main, groups = _parts(optimizer)
    twin = grouped_twin(main, groups, list(theirs))
    ours = {n: p.detach().clone() for n, p in model.named_parameters()}
    state, hparams = twin.init(ours), twin.hparams_for([main.values, *(g.values for g in groups)])
    start = {n: p.clone() for n, p in ours.items()}
    worst = 0.0
    for step in range(TRAJECTORY_STEPS):
        xb, yb = batch(step)
        for o in torch_optimizers:
            o.zero_grad()
        loss_of(theirs, xb, yb).backward()
        for o in torch_optimizers:
            o.step()
        ours, state = twin.update(grad(loss_of)(ours, xb, yb), state, ours, hparams)
        worst = max(worst, *(((ours[n] - p.detach()).norm() / p.detach().norm()).item() for n, p in theirs.items()))
    assert worst < 1e-10, f"relative difference {worst:.2e} over {TRAJECTORY_STEPS} steps"
    assert all((ours[n] - start[n]).norm() > 1e-3 * start[n].norm() for n in ours)  # every part trained


def test_the_groups_change_the_numbers():
    """The comparison above is meaningful: the same optimizer without its groups ends elsewhere."""
    model, loss_of, batch = _problem(torch.float64)
    ends = []
    for optimizer in (CASES["SGD-three-groups"][0], Optimizer(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-3)):
        main, groups = _parts(optimizer)
        twin = grouped_twin(main, groups, [n for n, _ in model.named_parameters()])
        ours = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = twin.init(ours)
        hparams = twin.hparams_for([main.values, *(g.values for g in groups)]) if groups else twin.hparams(**main.values)
        for step in range(20):
            ours, state = twin.update(grad(loss_of)(ours, *batch(step)), state, ours, hparams)
        ends.append(ours)
    assert all((ends[0][n] - ends[1][n]).norm() > 1e-4 * ends[1][n].norm() for n in BIASES + ["5.weight"])


def test_a_grid_over_a_groups_hyperparameters_is_one_step_and_each_learner_is_bitwise_itself_alone(experiment):
    grid = [Optimizer.make_variations(optimizer=torch.optim.SGD, lr=(0.05, 0.1),
                                      param_groups={"*.bias": dict(lr=(0.01, 0.1)), "3.*": dict(momentum=(0.5, 0.8))})]
    together = experiment(grid, steps=8, log_every=2)
    plan = together.plan()
    assert len(plan.chunks) == 1  # a group's numbers are per-learner tensors: one vmapped step for all 8
    ds = together.run()
    assert dict(ds.sizes) == {"lr": 2, "lr[*.bias]": 2, "momentum[3.*]": 2, "step": 5}
    assert ds["lr[*.bias]"].values.tolist() == [0.01, 0.1] and ds["momentum[3.*]"].values.tolist() == [0.5, 0.8]
    alone = experiment(grid, steps=8, log_every=2, max_learners_per_chunk=1).run()
    for metric in ("train_loss", "test_loss", "test_acc"):
        np.testing.assert_array_equal(ds[metric].values, alone[metric].values)
    assert len(np.unique(ds.train_loss.isel(step=-1))) == 8
    one = experiment([Optimizer(torch.optim.SGD, lr=0.1, param_groups={"*.bias": dict(lr=0.01), "3.*": dict(momentum=0.5)})],
                     steps=8, log_every=2).run()
    np.testing.assert_array_equal(ds.train_loss.sel({"lr": 0.1, "lr[*.bias]": 0.01, "momentum[3.*]": 0.5}).values,
                                  one.train_loss.values)


def test_a_mixed_grid_of_group_optimizers_is_one_result_and_each_learner_is_bitwise_itself_alone(experiment):
    grid = [Optimizer.make_variations(optimizer=torch.optim.Muon, lr=(0.01, 0.02), param_groups={
        "*.bias": Optimizer.make_variations(optimizer=(torch.optim.AdamW, torch.optim.SGD), lr=(3e-4, 1e-2))})]
    together = experiment(grid, steps=6, log_every=3)
    assert len(together.plan().chunks) == 2  # AdamW or SGD on the biases
    ds = together.run()
    assert dict(ds.sizes) == {"lr": 2, "optimizer[*.bias]": 2, "lr[*.bias]": 2, "step": 3}
    alone = experiment(grid, steps=6, log_every=3, max_learners_per_chunk=1).run()
    np.testing.assert_array_equal(ds.train_loss.values, alone.train_loss.values)
    assert len(np.unique(ds.train_loss.isel(step=-1))) == 8


def test_a_group_with_the_main_optimizers_values_changes_no_number(experiment):
    plain = experiment([Optimizer(torch.optim.Adam, lr=1e-3)], steps=6).run()
    grouped = experiment([Optimizer(torch.optim.Adam, lr=1e-3, param_groups={"*.bias": dict(lr=1e-3)})], steps=6).run()
    np.testing.assert_array_equal(plain.train_loss.values, grouped.train_loss.values)


def _ids(experiment, *optimizers):
    return [experiment([o]).grid.learners[0].id for o in optimizers]


def test_groups_are_part_of_the_id_and_what_a_glob_matched_not_its_spelling(experiment):
    sgd = dict(lr=0.1)
    ids = _ids(experiment, Optimizer(torch.optim.SGD, **sgd),
               Optimizer(torch.optim.SGD, **sgd, param_groups={"*.bias": dict(lr=0.01)}),
               Optimizer(torch.optim.SGD, **sgd, param_groups={"*.bias": dict(lr=0.02)}),
               Optimizer(torch.optim.SGD, **sgd, param_groups={"?.bias": dict(lr=0.01)}),
               Optimizer(torch.optim.SGD, **sgd, param_groups={"*.bias": Optimizer(torch.optim.SGD, lr=0.01)}),
               Optimizer(torch.optim.SGD, **sgd, param_groups={"*.bias": Optimizer(torch.optim.Adam, lr=0.01)}),
               Optimizer(torch.optim.SGD, **sgd, param_groups={"1.*": dict(lr=0.01), "*.bias": dict(lr=0.02)}))
    assert ids[1] == ids[3]  # the same parameters, the same values
    assert len(set(ids)) == 6  # every other change of the groups is another learner
    config = experiment([Optimizer(torch.optim.SGD, **sgd, param_groups={"*.bias": dict(lr=0.01)})]).grid.learners[0].config
    assert config["optimizer"]["param_groups"] == [{"params": ["1.bias", "3.bias"], "optimizer": "SGD", "dampening": 0.0,
                                                    "lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}]


@pytest.mark.parametrize("optimizer,kind", [
    (Optimizer(torch.optim.SGD, lr=0.05, momentum=0.9, param_groups={"*.bias": dict(lr=0.01, nesterov=True),
                                                                     "3.*": dict(momentum=0.5, weight_decay=1e-3)}),
     torch.optim.SGD),
    (Optimizer(torch.optim.Muon, lr=0.02, param_groups={"*.bias": Optimizer(torch.optim.AdamW, lr=3e-3)}),
     CombinedOptimizer),
], ids=["SGD-param-groups", "Muon-and-AdamW"])
def test_a_grouped_learner_loads_as_torch_optim_with_its_param_groups_and_goes_on_exactly(experiment, optimizer, kind):
    exp = experiment([PerturbWeights.make_variations(epsilon=(0.0, 0.1), seed=1)], optimizer=optimizer,
                     dtype=torch.float64, steps=10, keep_states=[4])
    exp.run()
    spec = next(s for s in exp.grid.learners if s.coords == {"epsilon": 0.1, "seed": 1})
    module, opt = exp.load_learner(step=4, epsilon=0.1)
    assert type(opt) is kind and len(opt.state) == 4  # the default test model: 1.weight, 1.bias, 3.weight, 3.bias
    names = {id(p): n for n, p in module.named_parameters()}
    groups = [(sorted(names[id(p)] for p in g["params"]), g["lr"]) for g in opt.param_groups]
    if kind is torch.optim.SGD:
        assert groups == [(["1.weight"], 0.05), (["1.bias", "3.bias"], 0.01), (["3.weight"], 0.05)]
        assert [g["nesterov"] for g in opt.param_groups] == [False, True, False]
    else:
        assert [type(o) for o in opt.optimizers] == [torch.optim.Muon, torch.optim.AdamW]
        assert groups == [(["1.weight", "3.weight"], 0.02), (["1.bias", "3.bias"], 3e-3)]
    go_on_with_torch(module, opt, spec, 4, 10)
    final, final_opt = exp.load_learner(epsilon=0.1)  # the final state, step 10
    assert_same_learner(module, opt, final, final_opt)


def test_a_glob_that_matches_nothing_is_refused_naming_the_parameters(experiment):
    with pytest.raises(ValueError, match=r"glob 'fc3\.\*': it matches no parameter\. The trained parameters are: "
                                         r"1\.weight, 1\.bias, 3\.weight"):
        experiment([Optimizer(torch.optim.SGD, lr=0.1, param_groups={"fc3.*": dict(lr=0.01)})]).plan()
    with pytest.raises(ValueError, match=r"glob '3\.\*': the parameters it matches \(3\.weight, 3\.bias\) are taken "
                                         r"by an earlier glob \(the first glob that matches wins\)"):
        experiment([Optimizer(torch.optim.SGD, lr=0.1, param_groups={"*": dict(lr=0.01), "3.*": dict(lr=0.1)})]).plan()


@pytest.mark.parametrize("groups,message", [
    ({"*.bias": dict(learning_rate=0.1)}, r"param_groups\['\*\.bias'\] has no hyperparameter 'learning_rate'"),
    ({"*.bias": dict(lr=-1.0)}, r"param_groups\['\*\.bias'\]: .*Invalid learning rate"),
    ({"*.bias": dict(lr=(0.01, 0.1))}, r"To vary a group's hyperparameter, give its values to Optimizer.make_variations"),
    ({"*.bias": 0.01}, r"takes a dict from a glob of parameter names"),
    ({"*.bias": Optimizer(lr=0.1)}, r"a group's Optimizer needs its class"),
    ([("*.bias", dict(lr=0.1))], r"takes a dict from a glob"),
])
def test_bad_groups_are_refused_with_the_fix(groups, message):
    with pytest.raises(ValueError, match=message):
        Optimizer(torch.optim.SGD, lr=0.1, param_groups=groups)


def test_variations_without_groups_take_the_experiments_groups_when_they_name_its_class(experiment):
    exp = experiment([Optimizer.make_variations(optimizers=(torch.optim.SGD, torch.optim.Adam), lr=(0.1, 0.2))],
                     optimizer=Optimizer(torch.optim.SGD, lr=0.1, param_groups={"*.bias": dict(lr=0.01)}))
    groups = {(s.coords["optimizer"], s.coords["lr"]): s.config["optimizer"].get("param_groups") for s in exp.grid.learners}
    assert all(g[0]["params"] == ["1.bias", "3.bias"] and g[0]["lr"] == 0.01 for (o, _), g in groups.items() if o == "SGD")
    assert all(g is None for (o, _), g in groups.items() if o == "Adam")  # another class: torch.optim's defaults, no groups


# -- hyperparameter perturbations reach every group ------------------------------------------------------------


def _halve_or_raise(m):
    return (m * 0.5, m * 1.05)


class GroupedHyperparameterTwin:
    """torch.optim.SGD with two param groups (weights; biases with their own lr and no momentum), whose values are
    changed by hand in the windows, as ``for g in optimizer.param_groups`` would: a number set in every group, the
    function applied to each group's own value."""

    def __new__(cls, spec, data):
        from tests.reference import Twin, windows_hold

        class Grouped(Twin):
            def __init__(self, spec, data):
                super().__init__(spec, data)
                named = dict(self.module.named_parameters())
                self.optimizer = torch.optim.SGD(
                    [{"params": [p for n, p in named.items() if not n.endswith("bias")]},
                     {"params": [p for n, p in named.items() if n.endswith("bias")], "lr": 0.01, "momentum": 0.0}],
                    lr=0.05, momentum=0.9, foreach=False)
                self.bases = [dict(g) for g in self.optimizer.param_groups]

            def before_step(self, step):
                v = self.spec.interventions[0]
                for group, base in zip(self.optimizer.param_groups, self.bases, strict=True):
                    group.update(lr=base["lr"], momentum=base["momentum"])
                    if not windows_hold(v.values["when"], step):
                        continue
                    functions = {"lr": lambda lr: (lr * 2,), "momentum": _halve_or_raise}
                    for name in ("lr", "momentum"):
                        if name in v.derived:
                            group[name] = functions[name](base[name])[v.derived[name][0]]
                        elif v.values[name] is not None:
                            group[name] = v.values[name]

        return Grouped(spec, data)


def test_perturbing_a_hyperparameter_changes_every_groups_value_as_torch_param_groups_would(experiment):
    from serimats_func.interventions import PerturbHyperparameter
    from tests.test_interventions import F64, assert_matches_twins

    grid = [PerturbHyperparameter.make_variations(momentum=_halve_or_raise, lr=lambda lr: lr * 2, when=(20, 60)),
            PerturbHyperparameter.make_variations(lr=0.2, momentum=0.8, when=(30, 50))]
    exp = experiment(grid, optimizer=Optimizer(torch.optim.SGD, lr=0.05, momentum=0.9,
                                               param_groups={"*.bias": dict(lr=0.01, momentum=0.0)}), **F64)
    assert len(exp.grid.learners) == 3
    assert_matches_twins(exp, GroupedHyperparameterTwin)
    numbers = {s.coords["momentum_change"]: s.interventions[0].numbers(s.setup) for s in exp.grid.learners}
    assert numbers[-0.5]["momentum"] == 0.45 and numbers[-0.5]["lr@1"] == 0.02  # each group from its own value
    assert numbers[-0.5]["momentum@1"] == 0.0  # half of the group's own 0
    number = next(s for s in exp.grid.learners if s.coords["momentum_change"] is not None and
                  s.interventions[0].values["lr"] == 0.2)
    assert number.interventions[0].numbers(number.setup)["momentum@1"] == 0.8  # a number sets every group


def test_ids_of_perturbed_learners_with_groups_name_what_each_group_gets(experiment):
    from serimats_func.interventions import PerturbHyperparameter

    groups = Optimizer(torch.optim.SGD, lr=0.1, param_groups={"*.bias": dict(lr=0.01)})
    plain = Optimizer(torch.optim.SGD, lr=0.1)

    def spec(lr, optimizer):
        return experiment([PerturbHyperparameter(lr=lr, when=(2, 4))], optimizer=optimizer).grid.learners[0]

    # on the main lr of 0.1 a doubling and lr=0.2 are one learner; with a group of lr 0.01 they are two
    assert spec(lambda lr: lr * 2, plain).id == spec(0.2, plain).id
    assert spec(lambda lr: lr * 2, groups).id != spec(0.2, groups).id
    assert spec(0.2, groups).config["interventions"]["PerturbHyperparameter"]["groups"] == [{"lr": 0.2}]
    assert "groups" not in spec(0.2, plain).config["interventions"]["PerturbHyperparameter"]
    # lr=0.1 is the main optimizer's own, but not the group's: it changes the group
    assert spec(0.1, groups).config["interventions"]["PerturbHyperparameter"] is not None
    assert spec(0.1, plain).config["interventions"] == {}
