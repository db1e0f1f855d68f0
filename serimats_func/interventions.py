"""Interventions: what makes one learner differ from another.

An intervention class names a kind of change (initial weights, a weight perturbation, the
optimizer, the data order); an instance is one variation, with a value for each of its axes.
``make_variations(**axes)`` is the product of its axes. An experiment concatenates the variations
of one class and multiplies those of different classes.

>>> vs = PerturbWeights.make_variations(epsilon=(0.001, 0.01), seed=range(3))
>>> len(vs), vs[0].values
(6, {'epsilon': 0.001, 'seed': 0, 'mode': 'relative'})

The changes themselves are pure functions of tensors (``perturb_weights`` below), with the
intervention's own numbers as per-learner tensors, so one vmapped call serves every learner.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import torch

from . import optimizers as optim_twins
from .keys import generator


class Variations(list):
    """The variations made by one ``make_variations`` call (a list of interventions)."""

    def __init__(self, cls: type[Intervention], items: Iterable[Intervention], given: tuple[str, ...]):
        super().__init__(items)
        self.cls = cls
        self.given = given


class Intervention:
    """Base class. Subclasses set ``prefix`` (used in coordinate names when two classes share an
    axis name, e.g. ``init_seed``), ``defaults`` (the axes and their default values) and may
    override ``_check`` and ``identity``."""

    prefix: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    tuple_axes: ClassVar[frozenset[str]] = frozenset()  # axes whose single value is a tuple
    aliases: ClassVar[dict[str, str]] = {}

    def __init__(self, control: bool = False, **values: Any):
        values = {self.aliases.get(k, k): v for k, v in values.items()}
        unknown = [k for k in values if k not in self.defaults]
        if unknown:
            raise ValueError(f"{type(self).__name__} has no axis {unknown[0]!r}; its axes are: "
                             f"{', '.join(self.defaults)}.")
        values = {k: _plain(v) for k, v in values.items()}
        self.given = tuple(values)
        self.control = bool(control)
        self.values = {**self.defaults, **{k: self._check(k, v) for k, v in values.items()}}

    def _check(self, axis: str, value: Any) -> Any:
        return value

    @classmethod
    def make_variations(cls, control: bool = False, **axes: Any) -> Variations:
        """The product of the given axes: one variation per combination of their values."""
        axes = {cls.aliases.get(k, k): v for k, v in axes.items()}
        names = tuple(axes)
        value_lists = [cls._values_of(name, value) for name, value in axes.items()]
        items = [cls(control=control, **dict(zip(names, combo, strict=False))) for combo in itertools.product(*value_lists)]
        return Variations(cls, items, names)

    @classmethod
    def _values_of(cls, name: str, value: Any) -> list:
        if isinstance(value, (np.ndarray, torch.Tensor)):
            value = _plain(value) if value.ndim == 0 else list(value)  # elements are made plain later
        single = isinstance(value, (str, bytes, type, numbers.Number)) or (
            name in cls.tuple_axes and isinstance(value, tuple) and not any(isinstance(v, (tuple, list)) for v in value)
        )
        values = [value] if single else list(value) if isinstance(value, Iterable) else [value]
        if not values:
            raise ValueError(f"{cls.__name__}.make_variations: axis {name!r} is empty; give it at least one value.")
        return values

    def identity(self) -> dict[str, Any]:
        """The values that name this variation in a learner's id (defaults filled in)."""
        return dict(self.values)

    def label(self, axis: str) -> Any:
        """The coordinate label of ``axis`` in results."""
        value = self.values[axis]
        return str(value) if isinstance(value, tuple) else value

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.values.items())
        return f"{type(self).__name__}({args}{', control=True' if self.control else ''})"


def _plain(value: Any) -> Any:
    """NumPy and 0-d torch numbers as Python numbers (float32 ones by their shortest repr, so
    that ``np.float32(0.001)`` labels as 0.001)."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.numpy()[()] if value.dtype != torch.bfloat16 else value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, np.floating):
        return float(np.format_float_positional(value, unique=True, trim="-"))
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _seed(axis: str, value: Any, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{owner} {axis} must be a non-negative integer; got {value!r}.")
    return int(value)


class InitWeights(Intervention):
    """Draw the initial weights with a different seed (the template's own initialization).

    >>> InitWeights.make_variations(seed=range(10))[3].values
    {'seed': 3}
    """

    prefix = "init"
    defaults = {"seed": 0}

    def _check(self, axis: str, value: Any) -> Any:
        return _seed(axis, value, "InitWeights")


class DataOrder(Intervention):
    """Shuffle the training data with a different seed (every learner's default is seed 0, so
    learners share batches unless this varies)."""

    prefix = "data"
    defaults = {"seed": 0}

    def _check(self, axis: str, value: Any) -> Any:
        return _seed(axis, value, "DataOrder")


class PerturbWeights(Intervention):
    """Perturb the initial weights by ``epsilon`` in a random direction drawn from ``seed``.

    ``mode="relative"`` (default) moves each parameter tensor w along a Gaussian direction to
    ||w' - w|| / ||w|| = epsilon; ``mode="absolute"`` adds Gaussian noise of standard deviation
    epsilon to every weight. One seed gives the same direction for every epsilon.
    """

    prefix = "perturb"
    defaults = {"epsilon": 0.0, "seed": 0, "mode": "relative"}

    def _check(self, axis: str, value: Any) -> Any:
        if axis == "epsilon":
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"PerturbWeights epsilon must be a finite number >= 0; got {value!r}.")
            return float(value)
        if axis == "mode":
            if value not in ("relative", "absolute"):
                raise ValueError(f"PerturbWeights mode must be 'relative' or 'absolute'; got {value!r}.")
            return value
        return _seed(axis, value, "PerturbWeights")

    def identity(self) -> dict[str, Any]:
        # A perturbation of size 0 is no perturbation, whatever its seed or mode.
        return {"epsilon": 0.0} if self.values["epsilon"] == 0 else dict(self.values)


class Optimizer(Intervention):
    """The optimizer, named by its torch.optim class, and its hyperparameters.

    >>> Optimizer(torch.optim.Adam, lr=0.01).values["optimizer"].__name__
    'Adam'
    >>> len(Optimizer.make_variations(optimizers=(torch.optim.SGD, torch.optim.Adam), lr=(0.1, 0.01)))
    4

    Hyperparameters not given come from the experiment's ``optimizer=`` when it is the same
    class, else from torch.optim's defaults for the class.
    """

    prefix = "optimizer"
    defaults = {"optimizer": None, **{k: None for c in optim_twins.SUPPORTED for k in optim_twins.hyperparameter_names(c)}}
    tuple_axes = frozenset({"betas"})
    aliases = {"optimizers": "optimizer"}

    def __init__(self, optimizer: type | None = None, control: bool = False, **values: Any):
        if optimizer is not None:
            values["optimizer"] = optimizer
        super().__init__(control=control, **values)
        torch_class = self.values["optimizer"]
        if torch_class is not None:
            optim_twins.resolve(torch_class, self.hyperparameters)  # refuse bad values now

    def _check(self, axis: str, value: Any) -> Any:
        if axis == "optimizer":
            if not isinstance(value, type):
                raise ValueError(f"Optimizer optimizer must be a torch.optim class such as torch.optim.SGD; got {value!r}.")
            optim_twins.hyperparameter_names(value)  # refuses classes without a twin
        return value

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k != "optimizer" and v is not None}

    def resolve(self, default: Optimizer) -> tuple[type, dict[str, Any]]:
        """The torch.optim class and every hyperparameter, defaults filled in."""
        torch_class = self.values["optimizer"] or default.values["optimizer"]
        values = self.hyperparameters
        if torch_class is default.values["optimizer"]:
            values = {**default.hyperparameters, **values}
        return torch_class, optim_twins.resolve(torch_class, values)

    def label(self, axis: str) -> Any:
        value = self.values[axis]
        return value.__name__ if isinstance(value, type) else super().label(axis)

    def __repr__(self) -> str:
        torch_class = self.values["optimizer"]
        args = [f"torch.optim.{torch_class.__name__}"] if torch_class else []
        args += [f"{k}={v!r}" for k, v in self.hyperparameters.items()]
        return f"Optimizer({', '.join(args)}{', control=True' if self.control else ''})"


# The seed's names.
InitWeightsIntervention = InitWeights
PerturbWeightsIntervention = PerturbWeights
OptimizerIntervention = Optimizer
DataOrderIntervention = DataOrder


def perturbation_directions(params: dict[str, torch.Tensor], key: int) -> dict[str, torch.Tensor]:
    """A standard Gaussian direction for every parameter tensor, drawn from ``key`` alone."""
    g = generator(key)
    return {name: torch.randn(p.shape, generator=g, dtype=p.dtype) for name, p in params.items()}


def perturb_weights(
    params: dict[str, torch.Tensor],
    directions: dict[str, torch.Tensor],
    epsilon: torch.Tensor,
    relative: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Pure: move each tensor w along its direction d by epsilon, relatively
    (||w' - w|| = epsilon ||w||) where ``relative`` is true, else by ``epsilon * d``.
    ``epsilon`` (float) and ``relative`` (bool) are scalars, per learner under vmap."""
    out = {}
    for name, w in params.items():
        d = directions[name]
        scale = torch.where(relative, epsilon * w.norm() / d.norm(), epsilon).to(w.dtype)
        out[name] = w + scale * d
    return out
