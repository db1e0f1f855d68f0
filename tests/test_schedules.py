"""Learning-rate schedules against torch.optim.lr_scheduler driving torch.optim: the lr of every step, whole
trajectories in float64, warmup as SequentialLR, OneCycleLR's momentum, windows of PerturbHyperparameter on top,
a grid of schedules bitwise each learner alone, ids, load_learner's scheduler, and bad input."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.optim import lr_scheduler as S

from serimats_func.interventions import LRSchedule, Optimizer, PerturbHyperparameter
from serimats_func.run.training import _tensor
from tests.reference import Twin, windows_hold
from tests.test_store_lifecycle import go_on_with_torch

STEPS = 200

#: One shared list of schedules that the schedule tests run over: (class, arguments), every family, with
#: arguments that make each change within 200 steps (cosine's second period, restarts, milestones repeated).
SCHEDULES = [
    (S.StepLR, dict(step_size=30, gamma=0.5)),
    (S.MultiStepLR, dict(milestones=(20, 50, 50, 120), gamma=0.3)),
    (S.ExponentialLR, dict(gamma=0.98)),
    (S.CosineAnnealingLR, dict(T_max=70, eta_min=1e-3)),
    (S.CosineAnnealingWarmRestarts, dict(T_0=10, T_mult=2, eta_min=1e-4)),
    (S.CosineAnnealingWarmRestarts, dict(T_0=15)),
    (S.CosineAnnealingWarmRestarts, dict(T_0=3, T_mult=3)),
    (S.LinearLR, dict(start_factor=0.25, end_factor=0.9, total_iters=80)),
    (S.ConstantLR, dict(factor=0.5, total_iters=40)),
    (S.PolynomialLR, dict(total_iters=150, power=2.0)),
    (S.OneCycleLR, dict(max_lr=0.1, total_steps=200)),
    (S.OneCycleLR, dict(max_lr=0.05, epochs=4, steps_per_epoch=50, anneal_strategy="linear", three_phase=True,
                        pct_start=0.25, base_momentum=0.8, max_momentum=0.9)),
]
IDS = [f"{cls.__name__}-{i}" for i, (cls, _) in enumerate(SCHEDULES)]
WARMUPS = {cls: (0,) if cls is S.OneCycleLR else (0, 25) for cls, _ in SCHEDULES}


def torch_scheduler(optimizer, cls, args, warmup):
    """torch's own scheduler, written out: ``warmup`` steps of LinearLR(0.1) then the schedule, as SequentialLR."""
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    if not warmup:
        return cls(optimizer, **args)
    warm = S.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
    return S.SequentialLR(optimizer, [warm, cls(optimizer, **args)], milestones=[warmup])


def torch_values(cls, args, warmup, optimizer_class=torch.optim.SGD, steps=STEPS, **settings):
    """lr (and momentum or beta1) of each update, as torch's scheduler sets them before each update."""
    param = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = optimizer_class([param], **{"lr": 0.1, **settings})
    scheduler = torch_scheduler(optimizer, cls, args, warmup)
    out = []
    for _ in range(steps):
        group = optimizer.param_groups[0]
        out.append((group["lr"], group["betas"][0] if "betas" in group else group.get("momentum")))
        if len(out) == steps:
            break
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    return out


def our_values(schedule, h):
    """The hook's lr and momentum (or beta1) at each step, one learner."""
    n = _tensor(schedule.numbers(None))
    out = []
    for t in range(STEPS):
        new = schedule.on_hyperparameters(h, n, SimpleNamespace(step=torch.tensor(t)))
        out.append((float(new["lr"]), float(new["beta1" if "beta1" in h else "momentum"])))
    return out


@pytest.mark.parametrize(("cls", "args"), SCHEDULES, ids=IDS)
def test_each_schedule_gives_torch_schedulers_lr_at_every_step_with_and_without_warmup(cls, args):
    h = {k: torch.tensor(v, dtype=torch.float64) for k, v in dict(lr=0.1, momentum=0.9).items()}
    for warmup in WARMUPS[cls]:
        expected = torch_values(cls, args, warmup, momentum=0.9)
        ours = our_values(LRSchedule(scheduler=cls, warmup=warmup, **args), h)
        np.testing.assert_allclose(np.array(ours), np.array(expected, dtype=float), rtol=1e-12, atol=1e-15)
        assert len({round(lr, 12) for lr, _ in expected}) >= 2  # the schedule does change the lr


def test_one_cycle_sets_beta1_for_optimizers_with_betas_as_torch_does():
    h = {k: torch.tensor(v, dtype=torch.float64) for k, v in dict(lr=1e-3, beta1=0.9, beta2=0.999).items()}
    args = dict(max_lr=0.01, total_steps=150, pct_start=0.4)
    expected = torch_values(S.OneCycleLR, args, 0, torch.optim.Adam, steps=151)
    ours = our_values(LRSchedule(scheduler=S.OneCycleLR, **args), h)
    np.testing.assert_allclose(np.array(ours[:151]), np.array(expected), rtol=1e-12, atol=1e-15)
    assert ours[199] == ours[150]  # beyond total_steps (where torch raises) it holds its value at total_steps


# -- whole trajectories: the library against torch.optim driven by torch's scheduler ---------------------------

F64 = {"dtype": torch.float64, "steps": STEPS, "log_every": 20}


def schedule_of(spec):
    return next(v for v in spec.interventions if isinstance(v, LRSchedule))


class ScheduleTwin(Twin):
    """torch.optim stepped by torch's scheduler after every update; a PerturbHyperparameter window sets the lr
    by hand for its updates (absolute, or times the scheduled lr for one given as a function), and the scheduled
    lr comes back before the scheduler steps."""

    def __init__(self, spec, data):
        super().__init__(spec, data)
        v = schedule_of(spec)
        self.scheduler = torch_scheduler(self.optimizer, v.values["scheduler"], v.resolved, v.values["warmup"])
        self.window = next((w for w in spec.interventions if isinstance(w, PerturbHyperparameter)), None)

    def before_step(self, step):
        group = self.optimizer.param_groups[0]
        self.scheduled = group["lr"]
        w = self.window
        if w is not None and w.values["lr"] is not None and windows_hold(w.values["when"], step):
            _, base, value = w.derived.get("lr", (None, None, None))
            group["lr"] = self.scheduled * value / base if "lr" in w.derived else w.values["lr"]

    def after_step(self, step):
        self.optimizer.param_groups[0]["lr"] = self.scheduled
        self.scheduler.step()


def assert_matches_schedule_twins(exp):
    ds = exp.run()
    steps = ds.step.values.tolist()
    for cell, spec in exp.grid.cells:
        expected = ScheduleTwin(spec, (spec.setup.data.x, spec.setup.data.y)).run(STEPS, 20)
        for step, value in expected.items():
            assert ds.train_loss.values[cell][steps.index(step)] == pytest.approx(value, rel=1e-10, abs=0), (spec.coords, step)
    return ds


@pytest.mark.parametrize(("cls", "args"), SCHEDULES, ids=IDS)
def test_training_with_each_schedule_matches_torch_optim_driven_by_torchs_scheduler_for_200_steps(experiment, cls, args):
    exp = experiment([LRSchedule.make_variations(scheduler=cls, warmup=WARMUPS[cls], **args)],
                     optimizer=Optimizer(torch.optim.SGD, lr=0.05, momentum=0.5), **F64)
    ds = assert_matches_schedule_twins(exp)
    assert ds.scheduler.item() == cls.__name__


def test_one_cycle_with_adam_cycles_beta1_as_torch_does(experiment):
    exp = experiment([LRSchedule(scheduler=S.OneCycleLR, max_lr=0.01, total_steps=STEPS, three_phase=True)],
                     optimizer=Optimizer(torch.optim.Adam, lr=1e-3), **F64)
    assert exp.grid.learners[0].setup.scheduled_hyperparameters == {"lr", "beta1"}
    assert_matches_schedule_twins(exp)


@pytest.mark.parametrize("lr", [(None, 0.2), lambda lr: (lr * 3, lr * 0.5)], ids=["absolute", "relative"])
def test_perturb_hyperparameter_windows_are_absolute_or_relative_to_the_scheduled_lr(experiment, lr):
    grid = [LRSchedule.make_variations(scheduler=S.CosineAnnealingLR, T_max=(60, 150), warmup=10),
            PerturbHyperparameter.make_variations(lr=lr, when=(40, 90))]
    exp = experiment(grid, optimizer=Optimizer(torch.optim.SGD, lr=0.05), **F64)
    assert len(exp.grid.learners) == 4
    ds = assert_matches_schedule_twins(exp)
    assert len(np.unique(ds.train_loss.isel(step=-1).values)) == 4


# -- one vmapped step for a grid of schedules -------------------------------------------------------------------

GRID = [LRSchedule.make_variations(scheduler=S.CosineAnnealingLR, T_max=(8, 20), eta_min=1e-3, warmup=(0, 5)),
        LRSchedule.make_variations(scheduler=S.MultiStepLR, milestones=((3, 9), (5, 12)), gamma=0.5)]


@pytest.mark.slow  # seven experiments, six of them chunks of one learner
def test_a_grid_of_schedules_trains_in_one_step_per_scheduler_and_each_learner_is_bitwise_itself_alone(experiment):
    together = experiment(GRID, steps=24, log_every=4)
    assert [len(c.learners) for c in together.plan().chunks] == [4, 2]  # one group per scheduler
    ds = together.run()
    alone = experiment(GRID, steps=24, log_every=4, max_learners_per_chunk=1).run()
    for metric in ("train_loss", "test_loss", "test_acc"):
        np.testing.assert_array_equal(ds[metric].values, alone[metric].values)
    cosines = experiment(GRID[:1], steps=24, log_every=4).run()  # the same 4 learners, in one chunk
    single = experiment([LRSchedule(scheduler=S.CosineAnnealingLR, T_max=20, eta_min=1e-3, warmup=5)],
                        steps=24, log_every=4).run()
    np.testing.assert_array_equal(cosines.train_loss.sel(T_max=20, warmup=5).values, single.train_loss.values)
    final = ds.train_loss.isel(step=-1).values
    assert len(np.unique(final[~np.isnan(final)])) == 6


# -- ids ---------------------------------------------------------------------------------------------------------

def test_a_schedule_is_part_of_the_id_with_its_defaults_and_no_schedule_names_the_same_learners(experiment):
    def ids(*interventions, **kw):
        return [s.id for s in experiment(list(interventions), **kw).grid.learners]

    plain = ids()
    assert ids(LRSchedule()) == plain == ids(LRSchedule(warmup=0))  # the default changes nothing
    cosine = ids(LRSchedule(scheduler=S.CosineAnnealingLR, T_max=100))
    assert cosine != plain and cosine == ids(LRSchedule(scheduler=S.CosineAnnealingLR, T_max=100.0, eta_min=0))
    others = [ids(LRSchedule(scheduler=S.CosineAnnealingLR, T_max=101)),
              ids(LRSchedule(scheduler=S.CosineAnnealingLR, T_max=100, warmup=10)),
              ids(LRSchedule(scheduler=S.CosineAnnealingWarmRestarts, T_0=100)), ids(LRSchedule(warmup=10))]
    assert len({tuple(i) for i in [plain, cosine, *others]}) == 6
    spec = experiment([LRSchedule(scheduler=S.OneCycleLR, max_lr=0.1, epochs=2, steps_per_epoch=8)]).grid.learners[0]
    assert spec.config["interventions"]["LRSchedule"]["total_steps"] == 16
    assert spec.id == ids(LRSchedule(scheduler=S.OneCycleLR, max_lr=0.1, total_steps=16))[0]


def test_a_window_given_as_a_function_under_a_schedule_is_named_apart_from_the_same_absolute_value(experiment):
    cosine = LRSchedule(scheduler=S.CosineAnnealingLR, T_max=100)
    relative = experiment([cosine, PerturbHyperparameter(lr=lambda lr: lr * 2, when=(4, 8))]).grid.learners[0]
    absolute = experiment([cosine, PerturbHyperparameter(lr=0.02, when=(4, 8))]).grid.learners[0]
    assert relative.config["interventions"]["PerturbHyperparameter"]["relative"] == ["lr"]
    assert relative.id != absolute.id
    unscheduled = [experiment([PerturbHyperparameter(lr=lr, when=(4, 8))]).grid.learners[0].id
                   for lr in (lambda lr: lr * 2, 0.02)]
    assert unscheduled[0] == unscheduled[1]  # without a schedule a function's value is absolute, as before


# -- load_learner ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("optimizer", "schedule"), [
    (Optimizer(torch.optim.SGD, lr=0.05, momentum=0.9), LRSchedule(scheduler=S.CosineAnnealingLR, T_max=12, warmup=5)),
    (Optimizer(torch.optim.Adam, lr=1e-3), LRSchedule(scheduler=S.OneCycleLR, max_lr=0.01, total_steps=20)),
    (Optimizer(torch.optim.SGD, lr=0.05), LRSchedule(scheduler=S.MultiStepLR, milestones=(3, 10), gamma=0.5)),
], ids=["cosine-warmup-sgd", "one-cycle-adam", "multistep-sgd"])
def test_load_learner_returns_the_torch_scheduler_with_its_state_and_plain_pytorch_goes_on_exactly(experiment,
                                                                                                    optimizer, schedule):
    exp = experiment([schedule], optimizer=optimizer, dtype=torch.float64, steps=20, keep_states=[8])
    exp.run()
    spec = exp.grid.learners[0]
    assert len(exp.load_learner(step=8)) == 2  # as before unless asked
    module, opt, scheduler = exp.load_learner(step=8, with_scheduler=True)
    assert scheduler.last_epoch == 8
    twin = ScheduleTwin(spec, (spec.setup.data.x, spec.setup.data.y))
    twin.run(8, 8)
    assert opt.param_groups[0]["lr"] == pytest.approx(twin.optimizer.param_groups[0]["lr"], rel=1e-12)
    go_on_with_torch(module, opt, spec, 8, 20, scheduler)
    final, _ = exp.load_learner()
    for (name, p), q in zip(module.state_dict().items(), final.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    plain = experiment([], steps=4)
    plain.run()
    assert plain.load_learner(with_scheduler=True)[2] is None  # no schedule


# -- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("make", "message"), [
    (lambda: LRSchedule(scheduler=S.LambdaLR), "No functional twin of the scheduler 'LambdaLR'; supported: .*CosineAnnealingLR"),
    (lambda: LRSchedule(scheduler="CosineAnnealingLR"), "must be a torch.optim.lr_scheduler class"),
    (lambda: LRSchedule(scheduler=S.StepLR, T_max=10), "StepLR has no argument 'T_max'; it takes: step_size, gamma"),
    (lambda: LRSchedule(scheduler=S.CosineAnnealingLR), "CosineAnnealingLR needs T_max"),
    (lambda: LRSchedule(T_max=10), "no scheduler; give scheduler="),
    (lambda: LRSchedule(scheduler=S.CosineAnnealingLR, T_max=10.5), "T_max must be an integer"),
    (lambda: LRSchedule(scheduler=S.CosineAnnealingLR, T_max=0), "T_max must be a positive integer"),
    (lambda: LRSchedule(scheduler=S.ExponentialLR, gamma=math.nan), "gamma must be a finite number"),
    (lambda: LRSchedule(scheduler=S.LinearLR, start_factor=2.0), "Starting multiplicative factor expected to be"),
    (lambda: LRSchedule(scheduler=S.OneCycleLR, max_lr=0.1, total_steps=100, warmup=10), "warms up on its own"),
    (lambda: LRSchedule(scheduler=S.OneCycleLR, max_lr=0.1), "total_steps OR"),
    (lambda: LRSchedule(scheduler=S.CosineAnnealingLR, T_max=10, warmup=-1), "warmup is a number of steps"),
])
def test_bad_schedules_are_refused_with_the_problem_and_the_fix(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_schedule_the_learners_optimizer_cannot_take_is_refused_when_the_experiment_is_built(experiment):
    one_cycle = LRSchedule(scheduler=S.OneCycleLR, max_lr=0.1, total_steps=100)
    with pytest.raises(ValueError, match="optimizer must support momentum or beta1"):
        experiment([one_cycle], optimizer=Optimizer(torch.optim.Adagrad, lr=0.01))
    with pytest.raises(ValueError, match="Muon: the parameters that are not matrices train with AdamW"):
        experiment([LRSchedule(scheduler=S.ExponentialLR, gamma=0.9)], optimizer=Optimizer(torch.optim.Muon, lr=0.02))
    with pytest.raises(ValueError, match="relative to the scheduled momentum, but its base value is 0"):
        experiment([one_cycle, PerturbHyperparameter(momentum=lambda m: m + 0.1, when=(2, 4))],
                   optimizer=Optimizer(torch.optim.SGD, lr=0.01))


class GroupedScheduleTwin(Twin):
    """torch.optim with two param groups (the biases at their own lr) stepped by torch's scheduler."""

    def __init__(self, spec, data, bias_lr):
        super().__init__(spec, data)
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        self.optimizer = spec.setup.optimizer_class(
            [{"params": [p for n, p in named if not n.endswith(".bias")]},
             {"params": [p for n, p in named if n.endswith(".bias")], "lr": bias_lr}], foreach=False, **self.base)
        v = schedule_of(spec)
        self.scheduler = torch_scheduler(self.optimizer, v.values["scheduler"], v.resolved, v.values["warmup"])

    def after_step(self, step):
        self.scheduler.step()


@pytest.mark.parametrize(("cls", "args"), [(S.CosineAnnealingLR, dict(T_max=40)), (S.StepLR, dict(step_size=30))])
def test_a_schedule_steps_every_parameter_groups_lr_as_torchs_scheduler_steps_each_param_group(experiment, cls, args):
    exp = experiment([LRSchedule.make_variations(scheduler=cls, warmup=10, **args)],
                     optimizer=Optimizer(torch.optim.SGD, lr=0.05, momentum=0.5, param_groups={"*.bias": dict(lr=0.2)}),
                     **F64)
    ds = exp.run()
    steps = ds.step.values.tolist()
    for cell, spec in exp.grid.cells:
        expected = GroupedScheduleTwin(spec, (spec.setup.data.x, spec.setup.data.y), 0.2).run(STEPS, 20)
        for step, value in expected.items():
            assert ds.train_loss.values[cell][steps.index(step)] == pytest.approx(value, rel=1e-10, abs=0), step


def test_a_schedule_beside_a_parameter_group_of_another_optimizer_is_refused(experiment):
    with pytest.raises(ValueError, match="parameter groups of another optimizer"):
        experiment([LRSchedule.make_variations(scheduler=S.CosineAnnealingLR, T_max=40)],
                   optimizer=Optimizer(torch.optim.SGD, lr=0.05, param_groups={"*.bias": Optimizer(torch.optim.Adam)}))
