"""The optimizer: a torch.optim class and its hyperparameters, and parameter groups.

>>> Optimizer(torch.optim.Adam, lr=0.01).values["optimizer"].__name__
'Adam'
>>> len(Optimizer.make_variations(optimizers=(torch.optim.SGD, torch.optim.Adam), lr=(0.1, 0.01)))
4
>>> vs = Optimizer.make_variations(optimizer=torch.optim.SGD, lr=0.1, param_groups={"2.*": dict(lr=(0.01, 0.1))})
>>> vs.given, [v.label("lr[2.*]") for v in vs]
(('optimizer', 'lr', 'lr[2.*]'), [0.01, 0.1])
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from .. import optimizers as twins
from ..optimizers.groups import ParamGroup
from .base import Intervention, Variations, _plain


class Optimizer(Intervention):
    """The optimizer, named by its torch.optim class, and its hyperparameters.

    Hyperparameters not given come from the experiment's ``optimizer=`` when it is the same class, else
    from torch.optim's defaults for the class. The class and the flags that change the optimizer's state
    (nesterov, amsgrad, SGD with or without momentum) are structural: each makes its own group.

    ``param_groups={glob: ...}``: the parameters whose names a glob matches (``fnmatch``; the first glob that
    matches a name wins) train with other hyperparameters (a dict of those that differ, as a torch.optim
    param group) or with another optimizer (an ``Optimizer``: its own hyperparameters and its class's
    defaults). In ``make_variations`` a group's hyperparameters are axes too, named ``lr[fc3.*]`` (and
    ``optimizer[fc3.*]`` for a group's optimizer).
    """

    axes = {"optimizer": None, **{k: None for c in twins.supported() for k in twins.hyperparameter_names(c)},
            "param_groups": None}
    prefix = "optimizer"
    tuple_axes = frozenset({"betas", "ns_coefficients"})
    aliases = {"optimizers": "optimizer"}
    order = -50
    builtin = True

    def __init__(self, optimizer: type | None = None, control: bool = False, **values: Any):
        if optimizer is not None:
            values["optimizer"] = optimizer
        super().__init__(control=control, **values)
        self.given = tuple(a for k in self.given for a in (self._group_axes() if k == "param_groups" else [k]))
        self.resolved: tuple[type, dict[str, Any]] | None = None
        torch_class = self.values["optimizer"]
        if torch_class is not None:
            twins.resolve(torch_class, self.hyperparameters)  # refuse bad values now
            for pattern, spec in (self.values["param_groups"] or {}).items():
                if isinstance(spec, Mapping):
                    _in_group(pattern, lambda spec=spec: twins.resolve(torch_class, {**self.hyperparameters, **spec}))

    @classmethod
    def make_variations(cls, control: bool = False, **axes: Any) -> Variations:
        """As ``Intervention.make_variations``, each hyperparameter of a group an axis too
        (``param_groups={"fc3.*": dict(lr=(0.01, 0.1))}``: coordinate ``lr[fc3.*]``)."""
        items = super().make_variations(control=control, **axes)
        groups = tuple(dict.fromkeys(a for v in items for a in v._group_axes()))
        return Variations(cls, items, tuple(a for k in items.given for a in (groups if k == "param_groups" else [k])))

    @classmethod
    def _values_of(cls, name: str, value: Any) -> list:
        if name != "param_groups" or value is None:
            return super()._values_of(name, value)
        if not isinstance(value, Mapping):
            raise ValueError(_GROUPS_USAGE.format(got=repr(value)))
        options = []
        for pattern, spec in value.items():
            if isinstance(spec, Optimizer):
                options.append([spec])
            elif isinstance(spec, (list, tuple)) and spec and all(isinstance(o, Optimizer) for o in spec):
                options.append(list(spec))  # Optimizer.make_variations(...): the group's optimizer is an axis
            elif isinstance(spec, Mapping):
                keys = list(spec)
                lists = [super(Optimizer, cls)._values_of(k, spec[k]) for k in keys]
                options.append([dict(zip(keys, combo, strict=True)) for combo in itertools.product(*lists)])
            else:
                raise ValueError(_GROUPS_USAGE.format(got=f"{{{pattern!r}: {spec!r}}}"))
        return [dict(zip(value, combo, strict=True)) for combo in itertools.product(*options)]

    def _group_axes(self) -> dict[str, tuple[str, str]]:
        """The coordinates of the groups' hyperparameters: ``lr[fc3.*]`` -> ("fc3.*", "lr")."""
        out = {}
        for pattern, spec in (self.values["param_groups"] or {}).items():
            keys = spec if isinstance(spec, Mapping) else spec.given
            out.update({f"{k}[{pattern}]": (pattern, k) for k in keys})
        return out

    def _check(self, axis: str, value: Any) -> Any:
        if axis == "param_groups":
            return _checked_groups(value)
        if axis == "optimizer":
            if not isinstance(value, type):
                raise ValueError(f"Optimizer optimizer must be a torch.optim class such as torch.optim.SGD (or "
                                 f"serimats_func.optimizers.Lion); got {value!r}.")
            twins.hyperparameter_names(value)  # refuses classes without a twin
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value):
            raise ValueError(f"Optimizer {axis} must be a finite number; got {value!r}.")
        return value

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k not in ("optimizer", "param_groups") and v is not None}

    def resolve_with(self, default: Optimizer) -> tuple[type, dict[str, Any]]:
        """The torch.optim class and every hyperparameter, defaults filled in."""
        torch_class = self.values["optimizer"] or default.values["optimizer"]
        values = self.hyperparameters
        if torch_class is default.values["optimizer"]:
            values = {**default.hyperparameters, **values}
        return torch_class, twins.resolve(torch_class, values)

    def groups_with(self, default: Optimizer) -> tuple[ParamGroup, ...]:
        """The parameter groups, in order, each with its optimizer and every hyperparameter (a dict group: the
        main optimizer's values with its own; an Optimizer group: its own and its class's defaults). Groups not
        given come from the experiment's ``optimizer=`` when it is the same class."""
        torch_class, values = self.resolve_with(default)
        groups = self.values["param_groups"]
        if groups is None and torch_class is default.values["optimizer"]:
            groups = default.values["param_groups"]
        out = []
        for pattern, spec in (groups or {}).items():
            if isinstance(spec, Optimizer):
                group = ParamGroup(pattern, spec.values["optimizer"],
                                   twins.resolve(spec.values["optimizer"], spec.hyperparameters))
            else:
                group = ParamGroup(pattern, torch_class, _in_group(pattern, lambda spec=spec: twins.resolve(
                    torch_class, {**values, **spec})))
            out.append(group)
        return tuple(out)

    def on_setup(self, setup: Any) -> None:
        setup.optimizer_class, setup.optimizer_values = self.resolve_with(setup.default_optimizer)
        setup.optimizer_groups = self.groups_with(setup.default_optimizer)

    def resolve(self, setup: Any) -> list[Intervention]:
        out = super().resolve(setup)
        for v in out:
            v.resolved = (setup.optimizer_class, setup.optimizer_values)
        return out

    def identity(self) -> None:
        return None  # the resolved optimizer is part of every learner's setup

    def structure(self) -> tuple:
        return ()  # the setup's optimizer structure says it

    def label(self, axis: str) -> Any:
        if axis not in self.values:  # a group's hyperparameter, lr[fc3.*]: None where this variation lacks it
            pattern, key = self._group_axes().get(axis, (None, None))
            spec = (self.values["param_groups"] or {}).get(pattern)
            if isinstance(spec, Optimizer):
                return spec.label(key) if key in spec.values else None
            value = None if spec is None else spec.get(key)
            return str(tuple(value)) if isinstance(value, (tuple, list)) else value
        if axis == "optimizer":
            return (self.resolved[0] if self.resolved else self.values["optimizer"]).__name__
        if self.resolved is None:
            return super().label(axis)
        value = self.resolved[1].get(axis)  # None (NaN in results) for a hyperparameter this optimizer lacks
        return str(tuple(value)) if isinstance(value, (tuple, list)) else value

    def __repr__(self) -> str:
        torch_class = self.values["optimizer"]
        args = [twins.family_of(torch_class).label] if torch_class else []
        args += [f"{k}={v!r}" for k, v in self.hyperparameters.items()]
        if self.values["param_groups"] is not None:
            args.append(f"param_groups={self.values['param_groups']!r}")
        return f"Optimizer({', '.join(args)}{', control=True' if self.control else ''})"


_GROUPS_USAGE = ("Optimizer param_groups takes a dict from a glob of parameter names to the hyperparameters that differ "
                 "for them or to another Optimizer, e.g. param_groups={{'fc3.*': dict(lr=0.01), '*.bias': "
                 "Optimizer(torch.optim.AdamW, lr=3e-4)}}; got {got}.")


def _checked_groups(value: Any) -> dict[str, Any] | None:
    """``param_groups`` as a dict {glob: dict of plain values, or an Optimizer with a class and no groups}."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise ValueError(_GROUPS_USAGE.format(got=repr(value)))
    out = {}
    for pattern, spec in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(_GROUPS_USAGE.format(got=f"the glob {pattern!r}"))
        if isinstance(spec, Optimizer):
            if spec.values["optimizer"] is None or spec.values["param_groups"] is not None:
                raise ValueError(f"Optimizer param_groups[{pattern!r}]: a group's Optimizer needs its class and has no "
                                 f"param_groups of its own; got {spec!r}.")
            out[pattern] = spec
        elif isinstance(spec, Mapping):
            unknown = [k for k in spec if k not in Optimizer.axes or k in ("optimizer", "param_groups")]
            if unknown:
                raise ValueError(f"Optimizer param_groups[{pattern!r}] has no hyperparameter {unknown[0]!r}; for another "
                                 f"optimizer, give an Optimizer: {{{pattern!r}: Optimizer(torch.optim.AdamW, lr=3e-4)}}.")
            out[pattern] = {k: _plain(v) for k, v in spec.items()}
        else:
            raise ValueError(_GROUPS_USAGE.format(got=f"{{{pattern!r}: {spec!r}}}"))
    return out


def _in_group(pattern: str, resolve: Any) -> Any:
    """``resolve()``, its error naming the group (and, for a tuple of values, how to vary them)."""
    try:
        return resolve()
    except ValueError as error:
        hint = (" To vary a group's hyperparameter, give its values to Optimizer.make_variations(param_groups=...)."
                if "got (" in str(error) else "")
        raise ValueError(f"Optimizer param_groups[{pattern!r}]: {error}{hint}") from error


def as_optimizer(value: Any) -> Optimizer:
    """``optimizer=`` of an Experiment: a torch.optim class or an ``Optimizer``."""
    if isinstance(value, type) and issubclass(value, torch.optim.Optimizer):
        value = Optimizer(value)
    if not isinstance(value, Optimizer) or value.values["optimizer"] is None:
        raise ValueError(f"optimizer= takes a torch.optim class or Optimizer(torch.optim.Adam, lr=1e-3); got {value!r}.")
    return value
