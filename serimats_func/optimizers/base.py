"""Functional optimizers and their registry.

An optimizer is a pair of pure functions, as in optax: ``init(params) -> state`` and
``update(grads, state, params, hparams) -> (params, state)``, over one learner's parameters. Its state is a
typed pytree (a NamedTuple) whose fields are named after torch.optim's state keys (``momentum_buffer``,
``exp_avg``, ``exp_avg_sq``, ``step``). Numeric hyperparameters (lr, momentum, betas...) arrive as float64
tensors in ``hparams``, so one update serves a different value per learner; flags that change the state's
structure (nesterov, amsgrad, whether SGD keeps a momentum buffer) are fixed when the optimizer is built.

Each optimizer family (SGD, Adam, ...) is one ``OptimizerFamily`` record in one registry, named by its
torch.optim class or, for an optimizer torch lacks, by a name of its own: ``register_optimizer`` adds one.

>>> import torch
>>> family_of(torch.optim.Adam).numbers({"lr": 0.1, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0})
{'lr': 0.1, 'eps': 1e-08, 'weight_decay': 0.0, 'beta1': 0.9, 'beta2': 0.99}
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optree
import torch

Params = dict[str, torch.Tensor]
OptState = Any  # a NamedTuple of the optimizer's family
HParams = dict[str, torch.Tensor]  # name -> float64 scalar; (N,) when stacked over learners

HPARAM_DTYPE = torch.float64
KERNEL_CHOICES = ("foreach", "fused")  # torch.optim arguments that pick kernels: accepted, no effect here


@dataclass(frozen=True)
class FunctionalOptimizer:
    """``init`` and ``update`` of one optimizer structure, plus the names of its numeric hyperparameters (the
    keys ``update`` reads from ``hparams``)."""

    name: str
    init: Callable[[Params], OptState]
    update: Callable[[Params, OptState, Params, HParams], tuple[Params, OptState]]
    numeric: tuple[str, ...]
    family: OptimizerFamily | None = None
    stacked: Callable[[Params, OptState, Params, HParams], tuple[Params, OptState]] | None = None
    # ``stacked``: the update of N learners at once on leaves (N, *shape) and numbers (N,), for families whose update
    # is not elementwise (matrix products, norms); ``update`` is then that update of one learner.

    @property
    def torch_class(self) -> type | None:
        return None if self.family is None else self.family.torch_class

    def hparams(self, **values: Any) -> HParams:
        """One learner's hyperparameters as float64 scalar tensors, the family's defaults filled in."""
        if self.family is not None:
            values = self.family.numbers(self.family.resolve(values))
        return {k: torch.tensor(float(values[k]), dtype=HPARAM_DTYPE) for k in self.numeric}


@dataclass(frozen=True)
class OptimizerFamily:
    """One optimizer of the registry: what it takes and how its functional twin is built.

    ``numeric`` arguments become per-learner tensors (a tuple-valued one, such as ``betas``, is split into the
    names ``split`` gives); ``flags`` choose the state's structure. ``build(resolved, varied)`` makes the twin
    (``varied``: hyperparameters that interventions change during training); ``structure(resolved, varied)``
    is what learners must share to train in one update; ``describe(structure)`` says it in words;
    ``torch_state(opt, name)`` turns the stored state of one parameter (``{field: tensor}``) into
    torch.optim's per-parameter state, for ``load_learner``. ``choices`` are structural arguments that are not
    True/False (Muon's ``ns_steps``); ``nullable`` names split numbers that may be None (NaN per learner: Adafactor's
    ``eps1``); ``probe_shape`` is the parameter shape torch.optim's own checks run on; ``make_torch(named, settings)``
    builds the torch.optim optimizer over groups of named parameters, each ``(named, settings)``, where
    ``torch_class([{"params": ..., **settings}, ...])`` does not."""

    name: str
    torch_class: type | None
    numeric: tuple[str, ...]
    flags: tuple[str, ...]
    build: Callable[[Mapping[str, Any], frozenset[str]], FunctionalOptimizer]
    structure: Callable[[Mapping[str, Any], frozenset[str]], tuple]
    describe: Callable[[tuple], str]
    torch_state: Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], dict | None]
    split: Mapping[str, tuple[str, ...]] = None  # type: ignore[assignment]
    defaults: Mapping[str, Any] | None = None  # for classes whose signature gives none
    skip_in_identity: Callable[[Mapping[str, Any], frozenset[str]], frozenset[str]] = lambda resolved, varied: frozenset()
    choices: tuple[str, ...] = ()
    nullable: frozenset[str] = frozenset()
    probe_shape: tuple[int, ...] = (1,)
    make_torch: Callable[[Sequence[tuple[Sequence[tuple[str, torch.Tensor]], Mapping[str, Any]]]],
                         torch.optim.Optimizer] | None = None

    @property
    def arguments(self) -> tuple[str, ...]:
        """Every hyperparameter it takes, numeric, flags, then other structural choices."""
        return self.numeric + self.flags + self.choices

    def torch_optimizer(self, named: Sequence[tuple[str, torch.Tensor]], settings: Mapping[str, Any]) -> torch.optim.Optimizer:
        """The torch.optim optimizer of these hyperparameters over the named parameters."""
        return self.torch_optimizer_groups([(named, settings)])

    def torch_optimizer_groups(self, groups: Sequence[tuple[Sequence[tuple[str, torch.Tensor]], Mapping[str, Any]]]
                               ) -> torch.optim.Optimizer:
        """The torch.optim optimizer with one param group per ``(named parameters, hyperparameters)``, in order."""
        if self.make_torch is not None:
            return self.make_torch(groups)
        if len(groups) == 1:
            named, settings = groups[0]
            return self.torch_class([p for _, p in named], **settings)
        return self.torch_class([{"params": [p for _, p in named], **settings} for named, settings in groups],
                                **groups[0][1])

    def numeric_names(self) -> tuple[str, ...]:
        """The per-learner numbers ``update`` reads, e.g. ``beta1, beta2`` for ``betas``."""
        split = self.split or {}
        return tuple(n for k in self.numeric for n in split.get(k, (k,)))

    def source_of(self, number: str) -> str:
        """The hyperparameter a number comes from (``beta1`` -> ``betas``)."""
        for k, names in (self.split or {}).items():
            if number in names:
                return k
        return number

    def torch_defaults(self) -> dict[str, Any]:
        """The defaults: torch.optim's own (from its signature), else the family's."""
        if self.defaults is not None:
            return dict(self.defaults)
        signature = inspect.signature(self.torch_class.__init__)
        out = {}
        for name in self.arguments:
            default = signature.parameters[name].default
            if default is not inspect.Parameter.empty and type(default).__name__ != "_RequiredParameter":
                out[name] = tuple(default) if isinstance(default, (tuple, list)) else default
        return out

    def resolve(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults filled in and each value checked (by torch.optim itself, with its messages, where it exists)."""
        where = self.label
        unknown = [k for k in values if k not in self.arguments and k not in KERNEL_CHOICES]
        if unknown:
            raise ValueError(f"{where} has no hyperparameter {unknown[0]!r} here; it takes: {', '.join(self.arguments)}.")
        resolved = self.torch_defaults()
        resolved.update({k: self._checked(k, v) for k, v in values.items() if k in self.arguments})
        if "lr" not in resolved:
            raise ValueError(f"{where} needs a learning rate: give lr=...")
        if self.torch_class is not None:
            try:
                self.torch_class([torch.zeros(self.probe_shape, requires_grad=True)], **resolved)
            except (ValueError, TypeError) as error:
                described = ", ".join(f"{k}={v!r}" for k, v in resolved.items())
                raise ValueError(f"{where}({described}): {error}") from error
        return resolved

    @property
    def label(self) -> str:
        if self.torch_class is None:
            return self.name
        module = self.torch_class.__module__
        return f"torch.optim.{self.name}" if module.startswith("torch.optim") else f"{module.rsplit('.', 1)[0]}.{self.name}"

    def _checked(self, name: str, value: Any) -> Any:
        """Flags True or False, tuple-valued numbers a tuple of finite floats, the rest a finite number
        (torch.optim accepts ``lr=nan``, which makes every number of a learner NaN)."""
        where = f"{self.label} {name}"
        if isinstance(value, torch.Tensor) and value.ndim == 0:
            value = value.item()
        if name in self.choices:
            return value  # checked by torch.optim itself
        if name in self.flags:
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be True or False; got {value!r}.")
            return value
        parts = (self.split or {}).get(name)
        if parts is not None:
            if not (isinstance(value, (tuple, list)) and len(value) == len(parts)
                    and all(_finite(b) or (b is None and n in self.nullable) for b, n in zip(value, parts, strict=True))):
                count = "a pair of" if len(parts) == 2 else str(len(parts))
                example = self.torch_defaults().get(name)
                raise ValueError(f"{where} must be {count} finite numbers ({', '.join(parts)}), e.g. {name}={example}; "
                                 f"got {value!r}.")
            return tuple(None if b is None else float(b) for b in value)
        if not _finite(value):
            raise ValueError(f"{where} must be a finite number; got {value!r}.")
        return value

    def numbers(self, resolved: Mapping[str, Any]) -> dict[str, float]:
        """The per-learner numbers ``update`` reads, tuple-valued ones split (``betas`` -> ``beta1, beta2``)."""
        split = self.split or {}
        out = {k: float(resolved[k]) for k in self.numeric if k not in split}
        for k, names in split.items():
            if k in resolved:
                out.update(zip(names, (math.nan if v is None else float(v) for v in resolved[k]), strict=True))
        return out

    def canonical(self, resolved: Mapping[str, Any], varied: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The hyperparameters that decide the numbers, for learner ids."""
        skip = self.skip_in_identity(resolved, varied)
        out: dict[str, Any] = {"optimizer": self.name}
        for k in sorted(resolved):
            if k in skip:
                continue
            v = resolved[k]
            if k in self.choices:
                out[k] = list(v) if isinstance(v, tuple) else v
                continue
            out[k] = [None if b is None else float(b) for b in v] if isinstance(v, tuple) else (
                float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v)
        return out


REGISTRY: dict[str, OptimizerFamily] = {}


def register_optimizer(family: OptimizerFamily) -> OptimizerFamily:
    """Add an optimizer family to the registry (by its name and its torch.optim class, if any)."""
    REGISTRY[family.name] = family
    return family


def family_of(optimizer: type | str) -> OptimizerFamily:
    """The registry's entry for a torch.optim class or a registered name."""
    name = optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", None)
    family = REGISTRY.get(name) if name is not None else None
    if family is None or (not isinstance(optimizer, str) and family.torch_class not in (None, optimizer)):
        names = ", ".join(sorted(f.label for f in REGISTRY.values()))
        raise ValueError(f"No functional twin of {getattr(optimizer, '__name__', optimizer)!r}; supported optimizers: {names}.")
    return family


def is_optimizer(value: Any) -> bool:
    """Whether ``value`` names a registered optimizer (a torch.optim class or a library class)."""
    try:
        family_of(value)
    except ValueError:
        return False
    return isinstance(value, type)


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def zeros_like(params: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}


@torch.library.custom_op("serimats_func::materialize", mutates_args=())
def _materialize(t: torch.Tensor) -> torch.Tensor:
    """A copy that torch.compile cannot fuse into its consumers (an opaque operator)."""
    return t.clone()


@_materialize.register_fake
def _(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


def per_dtype(make: Callable[[torch.dtype], dict]) -> Callable[[torch.dtype], dict]:
    """``make(dtype)``, computed once per dtype: the hyperparameters (float64) each parameter's arithmetic needs,
    converted once per update rather than once per parameter. Under torch.compile they are computed apart:
    fused into the elementwise update, each learner's bias corrections (float64 powers) would be recomputed
    for every vector of every parameter."""
    cache: dict[torch.dtype, dict] = {}

    def get(dtype: torch.dtype) -> dict:
        if dtype not in cache:
            values = make(dtype)
            if torch.compiler.is_compiling():
                values = {k: _materialize(v) for k, v in values.items()}
            cache[dtype] = values
        return cache[dtype]

    return get


def stacked_update(twin: FunctionalOptimizer, grads: Params, opt: OptState, params: Params, hparams: HParams
                   ) -> tuple[Params, OptState]:
    """``twin.update`` of N learners at once, on stacked leaves (N, ...): each viewed as (N, numel) and each
    per-learner number (N,) as (N, 1), so that they broadcast as under ``vmap``. The update is elementwise
    per learner, so every learner gets exactly the numbers ``vmap(twin.update)`` gives it. A family that is not
    elementwise (``twin.stacked``) gets the leaves in their true shape (N, *shape) and the numbers (N,).

    >>> twin = REGISTRY["SGD"].build(REGISTRY["SGD"].resolve({"lr": 0.1}), frozenset())
    >>> params = {"w": torch.ones(3, 2)}  # N = 3
    >>> hparams = {k: torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64) if k == "lr" else torch.zeros(3, dtype=torch.float64)
    ...            for k in twin.numeric}
    >>> new, _ = stacked_update(twin, {"w": torch.ones(3, 2)}, torch.func.vmap(twin.init)(params), params, hparams)
    >>> new["w"][:, 0].tolist()
    [0.8999999761581421, 0.800000011920929, 0.699999988079071]
    """
    if twin.stacked is not None:  # matrix operations (Muon, Adafactor): leaves in their true shape (N, *shape)
        return twin.stacked(grads, opt, params, hparams)
    n = len(optree.tree_leaves(params)[0])

    def rows(t: torch.Tensor) -> torch.Tensor:  # (N, ...) -> (N, numel); (N,) -> (N, 1)
        return t.reshape(n, -1) if t.ndim > 1 else t.reshape(n, 1)

    new_params, new_opt = twin.update(*(optree.tree_map(rows, tree, none_is_leaf=False)
                                        for tree in (grads, opt, params, hparams)))
    shaped = lambda new, old: new.reshape(old.shape)  # noqa: E731
    return (optree.tree_map(shaped, new_params, params, none_is_leaf=False),
            optree.tree_map(shaped, new_opt, opt, none_is_leaf=False))


def one_learner(stacked: Callable) -> Callable:
    """The update of one learner from a ``stacked`` update of N learners: every leaf given a learner axis of 1."""

    def update(grads: Params, state: OptState, params: Params, h: HParams) -> tuple[Params, OptState]:
        one = [optree.tree_map(lambda t: t.unsqueeze(0), tree) for tree in (grads, state, params, h)]
        new_params, new_state = stacked(*one)
        return ({k: v.squeeze(0) for k, v in new_params.items()}, optree.tree_map(lambda t: t.squeeze(0), new_state))

    return update


def per_learner(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-learner number (N,) viewed so that it broadcasts against a stacked leaf (N, *shape), in its dtype."""
    return value.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def standard_torch_state(*scalars: str) -> Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], dict | None]:
    """``torch_state`` of a family whose torch.optim class holds no state before the first step, then ``step`` and
    the other per-learner ``scalars`` (NAdam's ``mu_product``) as float32 tensors and the per-parameter fields."""

    def torch_state(opt: Mapping[str, torch.Tensor], param: Mapping[str, torch.Tensor]) -> dict | None:
        if float(opt["step"]) <= 0:
            return None
        out = {k: torch.tensor(float(opt[k]), dtype=torch.float32) for k in ("step", *scalars)}
        return {**out, **{k: v.clone() for k, v in param.items()}}

    return torch_state
