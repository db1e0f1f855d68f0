"""The optimizer: a torch.optim class and its hyperparameters.

>>> Optimizer(torch.optim.Adam, lr=0.01).values["optimizer"].__name__
'Adam'
>>> len(Optimizer.make_variations(optimizers=(torch.optim.SGD, torch.optim.Adam), lr=(0.1, 0.01)))
4
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .. import optimizers as twins
from .base import Intervention


class Optimizer(Intervention):
    """The optimizer, named by its torch.optim class, and its hyperparameters.

    Hyperparameters not given come from the experiment's ``optimizer=`` when it is the same class, else
    from torch.optim's defaults for the class. The class and the flags that change the optimizer's state
    (nesterov, amsgrad, SGD with or without momentum) are structural: each makes its own group.
    """

    axes = {"optimizer": None, **{k: None for c in twins.supported() for k in twins.hyperparameter_names(c)}}
    prefix = "optimizer"
    tuple_axes = frozenset({"betas", "ns_coefficients"})
    aliases = {"optimizers": "optimizer"}
    order = -50
    builtin = True

    def __init__(self, optimizer: type | None = None, control: bool = False, **values: Any):
        if optimizer is not None:
            values["optimizer"] = optimizer
        super().__init__(control=control, **values)
        self.resolved: tuple[type, dict[str, Any]] | None = None
        if self.values["optimizer"] is not None:
            twins.resolve(self.values["optimizer"], self.hyperparameters)  # refuse bad values now

    def _check(self, axis: str, value: Any) -> Any:
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
        return {k: v for k, v in self.values.items() if k != "optimizer" and v is not None}

    def resolve_with(self, default: Optimizer) -> tuple[type, dict[str, Any]]:
        """The torch.optim class and every hyperparameter, defaults filled in."""
        torch_class = self.values["optimizer"] or default.values["optimizer"]
        values = self.hyperparameters
        if torch_class is default.values["optimizer"]:
            values = {**default.hyperparameters, **values}
        return torch_class, twins.resolve(torch_class, values)

    def on_setup(self, setup: Any) -> None:
        setup.optimizer_class, setup.optimizer_values = self.resolve_with(setup.default_optimizer)

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
        return f"Optimizer({', '.join(args)}{', control=True' if self.control else ''})"


def as_optimizer(value: Any) -> Optimizer:
    """``optimizer=`` of an Experiment: a torch.optim class or an ``Optimizer``."""
    if isinstance(value, type) and issubclass(value, torch.optim.Optimizer):
        value = Optimizer(value)
    if not isinstance(value, Optimizer) or value.values["optimizer"] is None:
        raise ValueError(f"optimizer= takes a torch.optim class or Optimizer(torch.optim.Adam, lr=1e-3); got {value!r}.")
    return value
