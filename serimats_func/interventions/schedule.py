"""Learning-rate schedules, named by ``torch.optim.lr_scheduler``'s classes, with their arguments as axes.

``LRSchedule.make_variations(scheduler=torch.optim.lr_scheduler.CosineAnnealingLR, T_max=(1000, 2000), warmup=100)``
makes two learners whose lr follows torch's scheduler stepped once per update, after 100 steps of
``LinearLR(start_factor=0.1, total_iters=100)`` (as ``SequentialLR(..., milestones=[100])``). Every numeric argument
(``T_max``, ``eta_min``, ``gamma``, ``milestones``, ``warmup``...) is a per-learner number: learners that differ
in them share one vmapped step. The schedule acts at the ``on_hyperparameters`` hook point, before
``PerturbHyperparameter``, whose windows then set a value absolutely, or relative to the scheduled one when it is
given as a function of the base value.

>>> vs = LRSchedule.make_variations(scheduler=torch.optim.lr_scheduler.CosineAnnealingLR, T_max=(1000, 2000))
>>> len(vs), vs[1].identity()
(2, {'scheduler': 'CosineAnnealingLR', 'warmup': 0, 'T_max': 2000, 'eta_min': 0.0})
>>> vs[0].label("scheduler")
'CosineAnnealingLR'
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .. import optimizers as twins
from .. import schedules
from .base import Intervention

ARGUMENTS = tuple(dict.fromkeys(k for f in schedules.REGISTRY.values() for k in f.arguments))


class LRSchedule(Intervention):
    """The learning rate as a function of the step: torch's ``scheduler`` class with its arguments (torch's
    defaults for those not given), after ``warmup`` steps of linear warmup from 0.1 x the lr. ``scheduler=None``
    with ``warmup=0`` (the default) changes nothing."""

    axes = {"scheduler": None, "warmup": 0, **dict.fromkeys(ARGUMENTS)}
    prefix = "schedule"
    structural = frozenset({"scheduler", "anneal_strategy", "cycle_momentum", "three_phase"})
    tuple_axes = frozenset({"milestones"})
    aliases = {"schedulers": "scheduler"}
    windowed = False  # a schedule acts at every step; windows are PerturbHyperparameter's
    order = -10  # after Optimizer's setup (-50), before PerturbHyperparameter's hook (0)
    builtin = True

    def __init__(self, scheduler: type | None = None, control: bool = False, **values: Any):
        if scheduler is not None:
            values["scheduler"] = scheduler
        super().__init__(control=control, **values)
        scheduler = self.values["scheduler"]
        given = {k: v for k, v in self.values.items() if k in ARGUMENTS and v is not None}
        self._family = None if scheduler is None else schedules.family_of(scheduler)
        if self._family is None:
            if given:
                raise ValueError(f"LRSchedule got {next(iter(given))}= but no scheduler; give scheduler="
                                 "torch.optim.lr_scheduler.<class> (e.g. CosineAnnealingLR) with its arguments.")
            self._resolved: dict[str, Any] = {}
        else:
            self._resolved = self._family.resolve(given)
            if self._family.absolute and self.values["warmup"]:
                raise ValueError(f"LRSchedule: {self._family.name} sets the lr itself and warms up on its own "
                                 "(pct_start, div_factor); give warmup=0.")

    def _check(self, axis: str, value: Any) -> Any:
        if axis == "scheduler":
            if value is not None and not isinstance(value, type):
                raise ValueError(f"LRSchedule scheduler must be a torch.optim.lr_scheduler class such as "
                                 f"torch.optim.lr_scheduler.CosineAnnealingLR; got {value!r}.")
            if value is not None:
                schedules.family_of(value)  # refuses schedulers without a twin, naming those with one
        elif axis == "warmup":
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"LRSchedule warmup is a number of steps, an integer >= 0; got {value!r}.")
            return int(value)
        return value

    @property
    def resolved(self) -> dict[str, Any]:
        """The scheduler's arguments, torch's defaults filled in."""
        return dict(self._resolved)

    def is_default(self) -> bool:
        return self._family is None and self.values["warmup"] == 0

    def _flags(self) -> dict[str, Any]:
        return {} if self._family is None else self._family.flag_values(self._resolved)

    def _momentum_key(self, optimizer_class: Any) -> str | None:
        """The hyperparameter a momentum-cycling schedule sets: beta1 for optimizers with betas, else momentum."""
        if self._family is None or not self._family.cycles_momentum(self._flags()):
            return None
        names = twins.hyperparameter_names(optimizer_class)
        return "beta1" if "betas" in names else "momentum" if "momentum" in names else None

    def on_setup(self, setup: Any) -> None:
        """Which hyperparameters the schedule sets (``PerturbHyperparameter`` reads it); a momentum it cycles is
        varied in the step (SGD then keeps a momentum buffer)."""
        if self.is_default():
            return
        key = self._momentum_key(setup.optimizer_class)
        setup.scheduled_hyperparameters = frozenset({"lr"} | ({key} if key else set()))
        if key == "momentum":
            setup.varied_hyperparameters |= {"momentum"}

    def check(self, setup: Any) -> None:
        if self.is_default():
            return
        family = twins.family_of(setup.optimizer_class)
        others = sorted({twins.family_of(g.optimizer).name for g in setup.optimizer_groups
                         if twins.family_of(g.optimizer) is not family})
        if others:
            raise ValueError(f"LRSchedule with parameter groups of another optimizer ({', '.join(others)} beside "
                             f"{family.name}): torch's scheduler steps one optimizer, so the schedule of the others "
                             "would not be torch's; give the groups the main optimizer's class with their own "
                             "hyperparameters (param_groups={'*.bias': dict(lr=...)}), or leave the schedule out.")
        if family.name == "Muon" and any(p.ndim != 2 for n, p in setup.template.named_parameters()
                                         if n in setup.trainable_names):
            raise ValueError("LRSchedule with torch.optim.Muon: the parameters that are not matrices train with AdamW "
                             "at its own fixed lr, which a torch scheduler would also schedule; schedule Muon only on "
                             "models whose trainable parameters are all matrices, or use another optimizer.")
        probe = [("probe", torch.zeros(family.probe_shape, requires_grad=True))]
        optimizer = family.torch_optimizer(probe, setup.optimizer_values)
        schedules.build_torch(optimizer, self._family, self._resolved, self.values["warmup"])  # torch's own checks

    def numbers(self, setup: Any) -> dict[str, Any]:
        return {"warmup": self.values["warmup"],
                **({} if self._family is None else self._family.numbers(self._resolved))}

    def structure(self) -> tuple:
        """Learners share a step when they share the scheduler and its flags (and the length of milestones)."""
        if self.is_default():
            return ()
        return (("schedule", "warmup only" if self._family is None else self._family.structure(self._resolved)),)

    def identity(self) -> dict[str, Any] | None:
        if self.is_default():
            return None
        family = self._family
        return {"scheduler": None if family is None else family.name, "warmup": self.values["warmup"],
                **{k: list(v) if isinstance(v, tuple) else v for k, v in self._resolved.items()}}

    def label(self, axis: str) -> Any:
        if axis == "scheduler" and self.values["scheduler"] is None:
            return "none"
        return super().label(axis)

    def on_hyperparameters(self, h: dict, n: Any, ctx: Any) -> dict:
        """Every parameter group's lr follows the schedule from its own base value, as torch's scheduler steps each
        param group of the optimizer (``lr``, and ``lr@1``, ``lr@2``... of the groups); a cycled momentum too."""
        out = dict(h)
        flags = self._flags()
        for key in h:
            if _is_group_key(key, "lr"):
                out[key] = schedules.scheduled_lr(self._family, h[key], ctx.step, n, flags)
        if self._family is not None and self._family.cycles_momentum(flags):
            name = "beta1" if "beta1" in h else "momentum"
            for key in h:
                if _is_group_key(key, name):
                    out[key] = self._family.momentum(ctx.step, n, flags)
        return out


def _is_group_key(key: str, name: str) -> bool:
    """Whether ``key`` is hyperparameter ``name`` of the main optimizer (``lr``) or of a parameter group (``lr@1``)."""
    return key == name or key.startswith(f"{name}@")
