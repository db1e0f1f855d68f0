"""Learning-rate schedules as pure functions of the step, and their registry.

A schedule is a function ``lr(base, t, n, flags) -> lr`` of one learner: ``base`` its optimizer's learning rate
(a float64 scalar), ``t`` the number of updates done (an int64 scalar), ``n`` its numbers (the scheduler's numeric
arguments as tensors: ``n["T_max"]``), ``flags`` its structural arguments (strings, True/False). No Python branch
on a value: one vmapped step serves learners with different ``T_max``. Each family is one ``ScheduleFamily``
named by its ``torch.optim.lr_scheduler`` class, whose closed form it follows: the lr that torch's scheduler gives
after ``t`` calls of ``scheduler.step()``, one per update.

>>> import torch
>>> family = family_of(torch.optim.lr_scheduler.StepLR)
>>> resolved = family.resolve({"step_size": 10})
>>> resolved
{'step_size': 10, 'gamma': 0.1}
>>> n = {"step_size": torch.tensor(10), "gamma": torch.tensor(0.1, dtype=torch.float64)}
>>> float(family.lr(torch.tensor(1.0, dtype=torch.float64), torch.tensor(25), n, {}))
0.010000000000000002
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

Numbers = Mapping[str, torch.Tensor]  # the scheduler's arguments of one learner: name -> scalar (milestones (K,))
LrFn = Callable[[torch.Tensor, torch.Tensor, Numbers, Mapping[str, Any]], torch.Tensor]

WARMUP_START = 0.1  # warmup=W is LinearLR(start_factor=0.1, total_iters=W) before the schedule


@dataclass(frozen=True)
class ScheduleFamily:
    """One scheduler of the registry.

    ``integers``, ``floats`` and ``lists`` (tuples of integers: ``milestones``) are per-learner numbers; ``flags``
    (strings and True/False) are structural: learners that differ in them train apart, as do learners whose
    ``lists`` differ in length. ``lr(base, t, n, flags)`` is the learning rate after ``t`` updates; ``momentum(t,
    n, flags)``, where given, the momentum (or beta1) it sets when ``cycles_momentum(flags)``. An ``absolute``
    schedule ignores the optimizer's lr (OneCycleLR: ``max_lr``); ``complete(resolved)`` fills arguments that
    others decide (OneCycleLR's ``total_steps`` from ``epochs`` x ``steps_per_epoch``); ``refuse(resolved)``
    raises for values torch accepts but cannot step with."""

    torch_class: type
    lr: LrFn
    integers: tuple[str, ...] = ()
    floats: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()  # integers that may be None (OneCycleLR's total_steps, epochs, steps_per_epoch)
    momentum: Callable[[torch.Tensor, Numbers, Mapping[str, Any]], torch.Tensor] | None = None
    cycles_momentum: Callable[[Mapping[str, Any]], bool] = lambda flags: False
    absolute: bool = False
    complete: Callable[[dict[str, Any]], dict[str, Any]] = lambda resolved: resolved
    refuse: Callable[[Mapping[str, Any]], None] = lambda resolved: None

    @property
    def name(self) -> str:
        return self.torch_class.__name__

    @property
    def arguments(self) -> tuple[str, ...]:
        return self.integers + self.floats + self.lists + self.flags

    def torch_defaults(self) -> dict[str, Any]:
        """torch's own defaults, from the scheduler's signature."""
        signature = inspect.signature(self.torch_class.__init__)
        out = {}
        for name in self.arguments:
            default = signature.parameters[name].default
            if default is not inspect.Parameter.empty:
                out[name] = default
        return out

    def resolve(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every argument, torch's defaults filled in, each value checked (by torch's own constructor too)."""
        where = f"torch.optim.lr_scheduler.{self.name}"
        unknown = [k for k in values if k not in self.arguments]
        if unknown:
            raise ValueError(f"{where} has no argument {unknown[0]!r}; it takes: {', '.join(self.arguments)}.")
        resolved = self.torch_defaults()
        resolved.update({k: self._checked(k, v) for k, v in values.items()})
        missing = [k for k in self.arguments if k not in resolved]
        if missing:
            raise ValueError(f"{where} needs {missing[0]}: give {missing[0]}=... (it has no default).")
        order = list(inspect.signature(self.torch_class.__init__).parameters)
        resolved = dict(sorted(resolved.items(), key=lambda kv: order.index(kv[0])))  # torch's order of arguments
        build_torch(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0, momentum=0.9), self, resolved, 0)
        self.refuse(resolved)
        return self.complete(resolved)

    def _checked(self, name: str, value: Any) -> Any:
        where = f"torch.optim.lr_scheduler.{self.name} {name}"
        if isinstance(value, torch.Tensor) and value.ndim == 0:
            value = value.item()
        if name in self.flags:
            return value  # torch checks its strings; True/False below
        if name in self.lists:
            if not (isinstance(value, (tuple, list)) and all(_integer(v) for v in value)):
                raise ValueError(f"{where} must be a tuple of integers, e.g. {name}=(30, 80); got {value!r}.")
            return tuple(int(v) for v in value)
        if name in self.integers:
            if value is None and name in self.optional:
                return None
            if not _integer(value):
                raise ValueError(f"{where} must be an integer (a number of steps); got {value!r}.")
            return int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{where} must be a finite number; got {value!r}.")
        return float(value)

    def numbers(self, resolved: Mapping[str, Any]) -> dict[str, Any]:
        """The per-learner numbers ``lr`` reads: integers (int64), floats (float64), lists (int64 (K,))."""
        return {k: resolved[k] for k in self.integers + self.floats + self.lists if resolved.get(k) is not None}

    def flag_values(self, resolved: Mapping[str, Any]) -> dict[str, Any]:
        return {k: resolved[k] for k in self.flags}

    def structure(self, resolved: Mapping[str, Any]) -> str:
        """What learners of this scheduler must share to train in one step, in words:
        ``"OneCycleLR(anneal_strategy='cos', cycle_momentum=True, three_phase=False)"``, ``"MultiStepLR(3 milestones)"``."""
        parts = [f"{k}={resolved[k]!r}" for k in self.flags] + [f"{len(resolved[k])} {k}" for k in self.lists]
        return f"{self.name}({', '.join(parts)})" if parts else self.name


REGISTRY: dict[str, ScheduleFamily] = {}


def register_schedule(family: ScheduleFamily) -> ScheduleFamily:
    """Add a scheduler family to the registry, by its torch class's name."""
    REGISTRY[family.name] = family
    return family


def family_of(scheduler: type | str) -> ScheduleFamily:
    """The registry's entry for a ``torch.optim.lr_scheduler`` class (or its name)."""
    name = scheduler if isinstance(scheduler, str) else getattr(scheduler, "__name__", None)
    family = REGISTRY.get(name) if name is not None else None
    if family is None or (not isinstance(scheduler, str) and family.torch_class is not scheduler):
        names = ", ".join(f"torch.optim.lr_scheduler.{n}" for n in sorted(REGISTRY))
        raise ValueError(f"No functional twin of the scheduler {getattr(scheduler, '__name__', scheduler)!r}; "
                         f"supported: {names}.")
    return family


def scheduled_lr(family: ScheduleFamily | None, base: torch.Tensor, t: torch.Tensor, n: Numbers,
                 flags: Mapping[str, Any]) -> torch.Tensor:
    """The learning rate after ``t`` updates: ``n["warmup"]`` = W steps of ``LinearLR(start_factor=0.1,
    total_iters=W)``, then the schedule from its own step 0, as ``SequentialLR(..., milestones=[W])`` steps them
    (W = 0: the schedule alone; no family: the warmup alone, then ``base``)."""
    w = n["warmup"]
    after = base if family is None else family.lr(base, torch.clamp(t - w, min=0), n, flags)
    warm = base * (WARMUP_START + (1.0 - WARMUP_START) * t.double() / torch.clamp(w, min=1))
    return torch.where(t < w, warm, after)


def build_torch(optimizer: torch.optim.Optimizer, family: ScheduleFamily | None, resolved: Mapping[str, Any],
                warmup: int) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's scheduler that ``scheduled_lr`` follows, on ``optimizer`` (its param groups' lr and, for
    OneCycleLR, momentum or betas are set to step 0's), a ``SequentialLR`` after a warmup."""
    lr_scheduler = torch.optim.lr_scheduler
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            warm = lr_scheduler.LinearLR(optimizer, start_factor=WARMUP_START, total_iters=warmup) if warmup else None
            if family is None:
                return warm
            args = {k: v for k, v in resolved.items() if k in family.arguments}
            args = {k: list(v) if k in family.lists else v for k, v in args.items()}
            main = family.torch_class(optimizer, **args)
        except (ValueError, TypeError, ZeroDivisionError) as error:
            described = ", ".join(f"{k}={v!r}" for k, v in resolved.items())
            raise ValueError(f"torch.optim.lr_scheduler.{family.name if family else 'LinearLR'}({described}): "
                             f"{error}") from error
        if warm is None:
            return main
        return lr_scheduler.SequentialLR(optimizer, [warm, main], milestones=[warmup])


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) or (
        isinstance(value, float) and value.is_integer())
