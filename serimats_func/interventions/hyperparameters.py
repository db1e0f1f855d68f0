"""Hyperparameters that change during training: a value in step windows.

A value is absolute (``lr=0.05``) or a function of the learner's base value, as in the seed:
``momentum=lambda m: (m * (1 + eps) for eps in (0.001, -0.001))`` makes one variation per value,
labelled by its relative change (coordinate ``momentum_change``).

>>> vs = PerturbMomentum.make_variations(momentum=lambda m: (m * 1.1, m * 0.9), when=((0, 100), (500, 600)))
>>> len(vs), vs[0].label("when")
(2, '0-100')
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .. import optimizers as twins
from .base import Derived, Intervention

PERTURBABLE = ("lr", "momentum", "dampening", "weight_decay", "betas", "eps")


class PerturbHyperparameter(Intervention):
    """Set ``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``betas`` or ``eps`` to another value in
    the steps of ``when`` (default: every step), exactly as changing ``optimizer.param_groups`` in a
    torch.optim loop would. The optimizer's own value holds outside the windows."""

    axes = dict.fromkeys(PERTURBABLE)
    prefix = "perturb"
    tuple_axes = frozenset({"betas"})
    derived_axes = frozenset(PERTURBABLE)
    per_learner_axes = frozenset(PERTURBABLE)  # numbers() gives every hyperparameter (NaN: unchanged)
    order = 0
    builtin = True

    def _check(self, axis: str, value: Any) -> Any:
        if value is None or isinstance(value, Derived):
            return value
        name = type(self).__name__
        if axis == "betas":
            if not (isinstance(value, tuple) and len(value) == 2 and all(_finite(b) for b in value)):
                raise ValueError(f"{name} betas must be a pair of finite numbers; got {value!r}.")
            return tuple(float(b) for b in value)
        if not _finite(value):
            raise ValueError(f"{name} {axis} must be a finite number; got {value!r}.")
        return float(value)

    def changes(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k in PERTURBABLE and v is not None}

    def base_value(self, axis: str, setup: Any) -> Any:
        self._has(axis, setup)
        return setup.optimizer_values[axis]

    def _has(self, axis: str, setup: Any) -> None:
        if axis not in setup.optimizer_values:
            cls = setup.optimizer_class.__name__
            raise ValueError(f"{type(self).__name__} changes {axis}, which torch.optim.{cls} does not have; "
                             f"it has: {', '.join(k for k in setup.optimizer_values if k in PERTURBABLE)}.")

    def on_setup(self, setup: Any) -> None:
        """The hyperparameters this class changes are varied in the learner's step (its optimizer twin reads
        them per learner); the same for every value of a derived axis, so it is set once, before ``resolve``."""
        setup.varied_hyperparameters |= set(self.changes())

    def is_default(self) -> bool:
        return not self.changes()

    def first_active_step(self) -> int:
        return self.window_start()  # its hooks act only in its windows

    def identity(self) -> dict[str, Any] | None:
        base = getattr(self, "_base", None)
        changes = {k: v for k, v in self.changes().items() if base is None or base.get(k) != v}
        relative = sorted(a for a in getattr(self, "_relative", ()) if a in changes)
        if not changes and not relative:
            return None  # a value equal to the optimizer's own changes nothing
        when = self.values.get("when")
        out = {**{k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()},
               "when": None if when is None else [list(w) for w in when]}
        return {**out, "relative": relative} if relative else out  # only under a schedule: other ids keep their form

    def resolve(self, setup: Any) -> list[Intervention]:
        out = super().resolve(setup)
        for v in out:
            v._base = dict(setup.optimizer_values)
            family = twins.family_of(setup.optimizer_class)
            v._relative = frozenset(family.source_of(k) for k in v._relative_numbers(setup))  # axes: lr, betas
        return out

    def _relative_numbers(self, setup: Any) -> dict[str, tuple[float, float]]:
        """The hyperparameters (numbers, ``beta1``) this variation sets relative to a schedule's value: those an
        ``LRSchedule`` sets that were given as a function of the base value, with (base, value)."""
        scheduled = getattr(setup, "scheduled_hyperparameters", frozenset())
        if not scheduled or not self.derived:
            return {}
        family = twins.family_of(setup.optimizer_class)
        new = twins.numeric_hparams(setup.optimizer_class, {**setup.optimizer_values, **self.changes()})
        keep = twins.numeric_hparams(setup.optimizer_class, setup.optimizer_values)
        return {k: (keep[k], new[k]) for k in scheduled & set(new) if family.source_of(k) in self.derived}

    def check(self, setup: Any) -> None:
        changes = self.changes()
        for axis in changes:
            self._has(axis, setup)
        twins.resolve(setup.optimizer_class, {**setup.optimizer_values, **changes})  # torch.optim's own checks
        zero = [k for k, (base, _) in self._relative_numbers(setup).items() if base == 0]
        if zero:
            raise ValueError(f"{type(self).__name__}: {zero[0]} is given as a function of its base value, which makes it "
                             f"relative to the scheduled {zero[0]}, but its base value is 0; give an absolute value.")

    def numbers(self, setup: Any) -> dict[str, float]:
        """Every numeric hyperparameter of the learner's optimizer: the value in the window, NaN to keep; under an
        ``LRSchedule``, also ``<name>_scale`` for each hyperparameter it schedules: the factor on the scheduled value
        of one given as a function (``lr=lambda lr: lr * 2``: 2), NaN for one given absolutely or not at all."""
        new = twins.numeric_hparams(setup.optimizer_class, {**setup.optimizer_values, **self.changes()})
        keep = twins.numeric_hparams(setup.optimizer_class, setup.optimizer_values)
        family = twins.family_of(setup.optimizer_class)
        changed = {k for k in new if new[k] != keep[k] or family.source_of(k) in self.changes()}
        relative = self._relative_numbers(setup)
        out = {k: (new[k] if k in changed and k not in relative else math.nan) for k in new}
        for k in sorted(getattr(setup, "scheduled_hyperparameters", frozenset()) & set(new)):  # the same for the chunk
            out[f"{k}_scale"] = relative[k][1] / relative[k][0] if k in relative and k in changed else math.nan
        return out

    def on_hyperparameters(self, h: dict, n: Any, ctx: Any) -> dict:
        out = {}
        for k, v in h.items():
            if f"{k}_scale" in n:  # relative to the schedule's value
                v = torch.where(torch.isnan(n[f"{k}_scale"]), v, v * n[f"{k}_scale"])
            out[k] = torch.where(torch.isnan(n[k]), v, n[k]) if k in n else v
        return out


class PerturbMomentum(PerturbHyperparameter):
    """Change momentum in step windows (the seed's ``PerturbMomentumIntervention``).

    >>> PerturbMomentum(momentum=0.95, when=(100, 200)).values
    {'momentum': 0.95, 'when': ((100, 200),)}
    """

    axes = {"momentum": None}
    derived_axes = frozenset({"momentum"})
    per_learner_axes = frozenset({"momentum"})
    builtin = True


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

