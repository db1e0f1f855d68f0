"""Variations of the model itself: architecture as an axis.

>>> from serimats_func.models import MLP
>>> vs = Model.make_variations(factory=lambda width: MLP(widths=(width,)), width=(16, 32))
>>> [v.label("width") for v in vs], vs.given
([16, 32], ('width',))
>>> Model.make_variations(model={"small": MLP((8,)), "big": MLP((64,))})[1].label("model")
'big'
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .base import Intervention, Variations


class Model(Intervention):
    """Another model template for some learners. Either a factory with axes,
    ``Model.make_variations(factory=make_mlp, width=(64, 128, 256))`` (coordinates ``width``...), or
    labelled modules, ``Model.make_variations(model={"small": MLP((32,)), "big": MLP((256,))})``
    (coordinate ``model``). Structural: each model is its own group, all in one result."""

    axes = {"model": None}
    structural = frozenset({"model"})
    builtin = True

    def __init__(self, model: nn.Module | None = None, control: bool = False, label: str | None = None,
                 factory: Callable[..., nn.Module] | None = None, **factory_args: Any):
        super().__init__(control=control)
        if factory is not None:
            with torch.random.fork_rng(devices=[]):  # building a module draws from the global RNG: not ours to move
                try:
                    model = factory(**factory_args)
                except Exception as error:
                    raise ValueError(f"Model factory {getattr(factory, '__name__', factory)!r} failed with "
                                     f"{factory_args}: {type(error).__name__}: {error}") from error
            label = label or ",".join(f"{k}={v}" for k, v in factory_args.items()) or getattr(factory, "__name__", "model")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"Model takes torch.nn.Module templates; got {type(model).__name__}.")
        self.module = model
        self.values = {"model": label if label is not None else (type(model).__name__ if model is not None else None),
                       **factory_args}
        self.given = tuple(factory_args) if factory is not None else ("model",) if model is not None else ()

    @classmethod
    def make_variations(cls, control: bool = False, model: Any = None, factory: Callable | None = None,
                        **axes: Any) -> Variations:
        if factory is not None:
            if model is not None:
                raise ValueError("Model.make_variations takes factory= with its axes, or model=, not both.")
            names = tuple(axes)
            lists = [cls._values_of(name, value) for name, value in axes.items()]
            items = [cls(factory=factory, control=control, **dict(zip(names, combo, strict=True)))
                     for combo in itertools.product(*lists)]
            return Variations(cls, items, names)
        if axes:
            raise ValueError(f"Model.make_variations: {next(iter(axes))!r} is an axis of a factory; give factory= too.")
        if isinstance(model, nn.Module):
            model = {type(model).__name__: model}
        if isinstance(model, (list, tuple)):
            names = [type(m).__name__ for m in model]
            model = {(n if names.count(n) == 1 else f"{n}{i}"): m for i, (n, m) in enumerate(zip(names, model, strict=True))}
        if not isinstance(model, dict) or not model:
            raise ValueError("Model.make_variations takes model={'label': module, ...}, a list of modules, or "
                             "factory=fn with its axes (width=(64, 128)).")
        return Variations(cls, [cls(m, control=control, label=str(k)) for k, m in model.items()], ("model",))

    def on_setup(self, setup: Any) -> None:
        if self.module is not None:
            setup.model, setup.model_label = self.module, self.values["model"]

    def identity(self) -> None:
        return None  # the model's description is part of every learner's setup

    def structure(self) -> tuple:
        return (("model", self.values["model"]),)
