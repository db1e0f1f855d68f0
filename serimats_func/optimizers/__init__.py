"""Functional twins of torch.optim's optimizers, one registry of them (see ``base``).

>>> import torch
>>> opt = functional_twin(torch.optim.SGD, momentum=0.9)
>>> params = {"w": torch.ones(3, dtype=torch.float64)}
>>> state = opt.init(params)
>>> hparams = opt.hparams(lr=0.1, momentum=0.9)
>>> params, state = opt.update({"w": torch.ones(3, dtype=torch.float64)}, state, params, hparams)
>>> params["w"].tolist()
[0.9, 0.9, 0.9]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .adadelta import AdadeltaState, adadelta
from .adafactor import AdafactorState, adafactor
from .adagrad import AdagradState, adagrad
from .adam import AdamState, adam
from .adamax import AdamaxState, adamax
from .base import (
    HPARAM_DTYPE,
    REGISTRY,
    FunctionalOptimizer,
    OptimizerFamily,
    family_of,
    is_optimizer,
    register_optimizer,
)
from .groups import CombinedOptimizer, GroupedOptimizer, GroupedState, ParamGroup, grouped_twin
from .lion import Lion, LionState, lion
from .muon import MuonState, MuonWithAdamW, muon
from .nadam import NAdamState, nadam
from .radam import RAdamState, radam
from .rmsprop import RMSpropState, rmsprop
from .sgd import SGDState, sgd

__all__ = ["AdadeltaState", "AdafactorState", "AdagradState", "AdamState", "AdamaxState", "CombinedOptimizer",
           "FunctionalOptimizer", "GroupedOptimizer", "GroupedState", "HPARAM_DTYPE", "Lion", "LionState",
           "MuonState", "MuonWithAdamW", "NAdamState", "OptimizerFamily", "ParamGroup", "RAdamState", "REGISTRY",
           "RMSpropState", "SGDState", "adadelta", "adafactor", "adagrad", "adam", "adamax", "canonical", "family_of",
           "functional_twin", "grouped_twin", "hyperparameter_names", "is_optimizer", "lion", "muon", "nadam",
           "numeric_hparams", "radam", "register_optimizer", "resolve", "rmsprop", "sgd", "structure_key",
           "supported", "torch_defaults", "torch_optimizer"]


def supported() -> tuple[type | str, ...]:
    """The registered optimizers: torch.optim classes, or names for the library's own."""
    return tuple(f.torch_class or f.name for f in REGISTRY.values())


def hyperparameter_names(optimizer: type | str) -> tuple[str, ...]:
    """The hyperparameters an optimizer takes here, e.g. ``('lr', 'momentum', ...)`` for SGD."""
    return family_of(optimizer).arguments


def torch_defaults(optimizer: type | str) -> dict[str, Any]:
    """torch.optim's own defaults for ``optimizer`` (read from its signature)."""
    return family_of(optimizer).torch_defaults()


def resolve(optimizer: type | str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Fill in the defaults and validate (with torch.optim itself: same checks, same messages).

    >>> import torch
    >>> resolve(torch.optim.Adam, {"lr": 0.01})["betas"]
    (0.9, 0.999)
    """
    return family_of(optimizer).resolve(values)


def functional_twin(optimizer: type | str, varied: frozenset[str] = frozenset(), **values: Any) -> FunctionalOptimizer:
    """The functional optimizer that matches ``optimizer(params, **values)``'s structure; ``varied`` names
    hyperparameters that interventions change during training (a momentum that may become non-zero needs SGD's
    momentum buffer)."""
    family = family_of(optimizer)
    return family.build(family.resolve(values), frozenset(varied))


def structure_key(optimizer: type | str, resolved: Mapping[str, Any], varied: frozenset[str] = frozenset()) -> tuple:
    """Learners with equal keys can share one vmapped update."""
    return family_of(optimizer).structure(resolved, frozenset(varied))


def canonical(optimizer: type | str, resolved: Mapping[str, Any], varied: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The hyperparameters that decide the numbers, for learner ids.

    >>> import torch
    >>> canonical(torch.optim.SGD, resolve(torch.optim.SGD, {"lr": 0.1, "dampening": 0.5}))
    {'optimizer': 'SGD', 'lr': 0.1, 'momentum': 0.0, 'nesterov': False, 'weight_decay': 0.0}
    """
    return family_of(optimizer).canonical(resolved, frozenset(varied))


def numeric_hparams(optimizer: type | str, resolved: Mapping[str, Any]) -> dict[str, float]:
    """The per-learner numbers ``update`` reads, e.g. betas split into beta1 and beta2."""
    return family_of(optimizer).numbers(resolved)


def torch_optimizer(optimizer: type | str, named: list[tuple[str, Any]], **values: Any) -> Any:
    """The torch.optim optimizer that ``functional_twin(optimizer, **values)`` follows, over named parameters (for
    Muon with parameters that are not matrices: a ``MuonWithAdamW``)."""
    family = family_of(optimizer)
    return family.torch_optimizer(named, family.resolve(values))
