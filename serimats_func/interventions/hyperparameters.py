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
from ..optimizers.groups import hparam_name
from .base import Derived, Intervention

PERTURBABLE = ("lr", "momentum", "dampening", "weight_decay", "betas", "eps")


class PerturbHyperparameter(Intervention):
    """Set ``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``betas`` or ``eps`` to another value in
    the steps of ``when`` (default: every step), exactly as changing ``optimizer.param_groups`` in a
    torch.optim loop would. The optimizer's own value holds outside the windows.

    With parameter groups (``Optimizer(param_groups=...)``) every group is changed, as
    ``for g in optimizer.param_groups: g[name] = ...``: a number sets every group's value to it; a function of the
    base value is applied to each group's own value (``lr=lambda lr: lr * 2`` doubles each group's lr; the
    variation's k-th value is the k-th the function yields for that group). A group whose optimizer lacks the
    hyperparameter keeps its own."""

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
        groups = getattr(self, "_groups", ())
        in_groups = self._group_changes_of() if groups else []
        changes = {k: v for k, v in self.changes().items() if base is None or base.get(k) != v
                   or any(k in new and new[k] != g.get(k) for g, new in zip(groups, in_groups, strict=True))}
        relative = sorted(a for a in getattr(self, "_relative", ()) if a in changes)
        if not changes and not relative:
            return None  # a value equal to the optimizer's own (and every group's) changes nothing
        when = self.values.get("when")
        out = {**{k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()},
               "when": None if when is None else [list(w) for w in when]}
        if relative:
            out["relative"] = relative  # only under a schedule: other ids keep their form
        if groups:  # only with parameter groups, which it changes too (each group by its own value, if derived)
            out["groups"] = [{k: list(v) if isinstance(v, tuple) else v for k, v in sorted(g.items())}
                             for g in in_groups]
        return out

    def resolve(self, setup: Any) -> list[Intervention]:
        self._functions = {a: f for a, f in self.values.items() if isinstance(f, Derived)}  # copied to each variation
        out = super().resolve(setup)
        for v in out:
            v._base = dict(setup.optimizer_values)
            v._groups = tuple(dict(g.values) for g in setup.optimizer_groups)
            v._group_classes = tuple(g.optimizer for g in setup.optimizer_groups)
            family = twins.family_of(setup.optimizer_class)
            v._relative = frozenset(family.source_of(k) for k in v._relative_numbers(setup))  # axes: lr, betas
        return out

    def group_changes(self, group: Any) -> dict[str, Any]:
        """What this variation sets in one parameter group (a ``ParamGroup``): each changed hyperparameter its optimizer
        has, a number as it is, a derived one from the group's own base value."""
        return self._changes_in(group.optimizer, group.values)

    def _changes_in(self, optimizer: Any, values: dict[str, Any]) -> dict[str, Any]:
        names = twins.hyperparameter_names(optimizer)
        out = {}
        for axis, value in self.changes().items():
            if axis not in names:
                continue
            if axis in self.derived:
                index = self.derived[axis][0]
                options = self._functions[axis].values(values[axis], type(self).__name__)
                if index >= len(options):
                    raise ValueError(f"{type(self).__name__}: the function given for {axis!r} yields {len(options)} "
                                     f"value(s) on a parameter group's {axis}={values[axis]!r} but {index + 1} on the "
                                     "optimizer's own; give a function that yields as many values for every group.")
                value = self._check(axis, options[index])
            out[axis] = value
        return out

    def _group_changes_of(self) -> list[dict[str, Any]]:
        return [self._changes_in(c, g) for c, g in zip(self._group_classes, self._groups, strict=True)]

    def _parts(self, setup: Any) -> list[tuple[Any, dict[str, Any], dict[str, Any]]]:
        """(optimizer class, its values, what this variation sets there) for the main optimizer, then each group."""
        main = (setup.optimizer_class, setup.optimizer_values, self.changes())
        return [main, *((g.optimizer, g.values, self.group_changes(g)) for g in setup.optimizer_groups)]

    def _relative_numbers(self, setup: Any, part: int = 0) -> dict[str, tuple[float, float]]:
        """The hyperparameters (numbers, ``beta1``) this variation sets relative to a schedule's value in one part of
        the optimizer (0: the main one; i: group i): those an ``LRSchedule`` sets that were given as a function of
        the base value, with (base, value)."""
        scheduled = getattr(setup, "scheduled_hyperparameters", frozenset())
        if not scheduled or not self.derived:
            return {}
        optimizer, values, changes = self._parts(setup)[part]
        family = twins.family_of(optimizer)
        new = twins.numeric_hparams(optimizer, {**values, **changes})
        keep = twins.numeric_hparams(optimizer, values)
        return {k: (keep[k], new[k]) for k in scheduled & set(new) if family.source_of(k) in self.derived}

    def check(self, setup: Any) -> None:
        for axis in self.changes():
            self._has(axis, setup)
        for part, (optimizer, values, changes) in enumerate(self._parts(setup)):
            where = "" if part == 0 else f" in parameter group {part} ({setup.optimizer_groups[part - 1].pattern!r})"
            try:
                twins.resolve(optimizer, {**values, **changes})  # torch.optim's own checks
            except ValueError as error:
                raise ValueError(f"{type(self).__name__}{where}: {error}") from error
            zero = [k for k, (base, _) in self._relative_numbers(setup, part).items() if base == 0]
            if zero:
                raise ValueError(f"{type(self).__name__}: {zero[0]}{where} is given as a function of its base value, "
                                 f"which makes it relative to the scheduled {zero[0]}, but its base value is 0; give an "
                                 "absolute value.")

    def numbers(self, setup: Any) -> dict[str, float]:
        """Every numeric hyperparameter of the learner's optimizer, and of each parameter group (``lr@1``): the value
        in the window, NaN to keep; under an ``LRSchedule``, also ``<name>_scale`` for each hyperparameter it
        schedules: the factor on the scheduled value of one given as a function (``lr=lambda lr: lr * 2``: 2), NaN
        for one given absolutely or not at all."""
        scheduled = getattr(setup, "scheduled_hyperparameters", frozenset())
        out: dict[str, float] = {}
        for part, (optimizer, values, changes) in enumerate(self._parts(setup)):
            new = twins.numeric_hparams(optimizer, {**values, **changes})
            keep = twins.numeric_hparams(optimizer, values)
            family = twins.family_of(optimizer)
            changed = {k for k in new if new[k] != keep[k] or family.source_of(k) in changes}
            relative = self._relative_numbers(setup, part)
            out.update({hparam_name(k, part): (new[k] if k in changed and k not in relative else math.nan) for k in new})
            for k in sorted(scheduled & set(new)):  # the same for the chunk
                scale = relative[k][1] / relative[k][0] if k in relative and k in changed else math.nan
                out[f"{hparam_name(k, part)}_scale"] = scale
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

