"""Functional twins of ``torch.optim.SGD``, ``Adam`` and ``AdamW``.

An optimizer is a pair of pure functions (as in optax): ``init(params) -> state`` and
``update(grads, state, params, hparams) -> (params, state)``. Numeric hyperparameters (lr,
momentum, betas, ...) arrive as tensors in ``hparams``, so one vmapped update serves a different
value per learner. Flags that change the state's structure (nesterov, amsgrad, whether SGD keeps
a momentum buffer) are fixed when the optimizer is built. The arithmetic follows torch.optim's
single-tensor code line by line; the tests check them against each other step for step.

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

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

Params = dict[str, torch.Tensor]
OptState = dict[str, Any]
HParams = dict[str, torch.Tensor]  # name -> float64 scalar (N,) when stacked over learners

HPARAM_DTYPE = torch.float64


@dataclass(frozen=True)
class FunctionalOptimizer:
    """``init`` and ``update`` of one optimizer structure, plus the names of its numeric
    hyperparameters (the keys ``update`` reads from ``hparams``)."""

    name: str
    init: Callable[[Params], OptState]
    update: Callable[[Params, OptState, Params, HParams], tuple[Params, OptState]]
    numeric: tuple[str, ...]
    torch_class: type | None = None

    def hparams(self, **values: Any) -> HParams:
        """One learner's hyperparameters as float64 scalar tensors, torch's defaults filled in."""
        if self.torch_class is not None:
            values = numeric_hparams(self.torch_class, resolve(self.torch_class, values))
        return {k: torch.tensor(float(values[k]), dtype=HPARAM_DTYPE) for k in self.numeric}


def _zeros_like(params: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}


@torch.library.custom_op("serimats_func::materialize", mutates_args=())
def _materialize(t: torch.Tensor) -> torch.Tensor:
    """A copy that torch.compile cannot fuse into its consumers (an opaque operator)."""
    return t.clone()


@_materialize.register_fake
def _(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t)


def _per_dtype(make: Callable[[torch.dtype], dict]) -> Callable[[torch.dtype], dict]:
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


def sgd(momentum_buffer: bool = False, nesterov: bool = False) -> FunctionalOptimizer:
    """SGD with momentum, dampening, nesterov and (L2) weight decay, as ``torch.optim.SGD``.

    With ``momentum_buffer``, the state keeps torch's buffer and whether it exists yet: torch starts the
    buffer at the first step whose momentum is not 0 (``buf = d_p``), and a step with momentum 0 uses the
    plain gradient and leaves the buffer alone, so momentum may change between steps exactly as it can
    in ``optimizer.param_groups``."""

    def init(params: Params) -> OptState:
        state: OptState = {"step": torch.zeros((), dtype=HPARAM_DTYPE)}
        if momentum_buffer:
            state["momentum_buffer"] = _zeros_like(params)
            state["has_buffer"] = torch.zeros((), dtype=torch.bool)
        return state

    def update(grads: Params, state: OptState, params: Params, h: HParams) -> tuple[Params, OptState]:
        new_params, new_buffers = {}, {}
        if momentum_buffer:
            uses_momentum = h["momentum"] != 0
            fresh = ~state["has_buffer"]
        scalars = _per_dtype(lambda dt: {"wd": h["weight_decay"].to(dt), "m": h["momentum"].to(dt),
                                         "keep": (1 - h["dampening"]).to(dt), "step": (-h["lr"]).to(dt)})
        for name, p in params.items():
            c = scalars(p.dtype)
            d_p = grads[name] + p * c["wd"]
            if momentum_buffer:
                m = c["m"]
                old = state["momentum_buffer"][name]
                later = old * m + d_p * c["keep"]
                buf = torch.where(fresh, d_p, later)  # torch starts the buffer at d_p
                new_buffers[name] = torch.where(uses_momentum, buf, old)
                with_momentum = d_p + buf * m if nesterov else buf
                d_p = torch.where(uses_momentum, with_momentum, d_p)
            new_params[name] = p + c["step"] * d_p
        new_state: OptState = {"step": state["step"] + 1}
        if momentum_buffer:
            new_state["momentum_buffer"] = new_buffers
            new_state["has_buffer"] = state["has_buffer"] | uses_momentum
        return new_params, new_state

    return FunctionalOptimizer("SGD", init, update, ("lr", "momentum", "dampening", "weight_decay"))


def adam(amsgrad: bool = False, decoupled_weight_decay: bool = False) -> FunctionalOptimizer:
    """Adam (L2 weight decay) or, with ``decoupled_weight_decay``, AdamW, as torch.optim's."""

    def init(params: Params) -> OptState:
        state: OptState = {
            "step": torch.zeros((), dtype=HPARAM_DTYPE),
            "exp_avg": _zeros_like(params),
            "exp_avg_sq": _zeros_like(params),
        }
        if amsgrad:
            state["max_exp_avg_sq"] = _zeros_like(params)
        return state

    def update(grads: Params, state: OptState, params: Params, h: HParams) -> tuple[Params, OptState]:
        step = state["step"] + 1
        lr, beta1, beta2, wd = h["lr"], h["beta1"], h["beta2"], h["weight_decay"]
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1
        new_params: Params = {}
        new_state: OptState = {"step": step, "exp_avg": {}, "exp_avg_sq": {}}
        if amsgrad:
            new_state["max_exp_avg_sq"] = {}
        scalars = _per_dtype(lambda dt: {"decay" if decoupled_weight_decay else "wd":
                                         ((1 - lr * wd) if decoupled_weight_decay else wd).to(dt),
                                         "w1": (1 - beta1).to(dt), "beta2": beta2.to(dt), "w2": (1 - beta2).to(dt),
                                         "bc2": bias_correction2_sqrt.to(dt), "eps": h["eps"].to(dt),
                                         "step": (-step_size).to(dt)})
        for name, p in params.items():
            c, g = scalars(p.dtype), grads[name]
            if decoupled_weight_decay:
                p = p * c["decay"]
            else:
                g = g + p * c["wd"]
            exp_avg = torch.lerp(state["exp_avg"][name], g, c["w1"])
            exp_avg_sq = state["exp_avg_sq"][name] * c["beta2"] + c["w2"] * g * g
            second = exp_avg_sq
            if amsgrad:
                second = torch.maximum(state["max_exp_avg_sq"][name], exp_avg_sq)
                new_state["max_exp_avg_sq"][name] = second
            denom = second.sqrt() / c["bc2"] + c["eps"]
            new_params[name] = p + c["step"] * exp_avg / denom
            new_state["exp_avg"][name] = exp_avg
            new_state["exp_avg_sq"][name] = exp_avg_sq
        return new_params, new_state

    name = "AdamW" if decoupled_weight_decay else "Adam"
    return FunctionalOptimizer(name, init, update, ("lr", "beta1", "beta2", "eps", "weight_decay"))


# What each supported torch.optim class accepts. "numeric" become per-learner tensors; "static"
# choose the structure. Arguments that only pick torch's kernels (foreach, fused) are accepted
# and have no effect here; the rest of torch's arguments (maximize, ...) are not supported.
_NUMERIC = {
    torch.optim.SGD: ("lr", "momentum", "dampening", "weight_decay"),
    torch.optim.Adam: ("lr", "betas", "eps", "weight_decay"),
    torch.optim.AdamW: ("lr", "betas", "eps", "weight_decay"),
}
_STATIC = {
    torch.optim.SGD: ("nesterov",),
    torch.optim.Adam: ("amsgrad",),
    torch.optim.AdamW: ("amsgrad",),
}
_KERNEL_CHOICES = ("foreach", "fused")
SUPPORTED = tuple(_NUMERIC)


def hyperparameter_names(torch_class: type) -> tuple[str, ...]:
    """The hyperparameters a class takes here, e.g. ``('lr', 'momentum', ...)`` for SGD."""
    _check_supported(torch_class)
    return _NUMERIC[torch_class] + _STATIC[torch_class]


def _check_supported(torch_class: type) -> None:
    if torch_class not in _NUMERIC:
        names = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED)
        raise ValueError(f"No functional twin of {getattr(torch_class, '__name__', torch_class)!r}; "
                         f"supported optimizers: {names}.")


def torch_defaults(torch_class: type) -> dict[str, Any]:
    """torch.optim's own defaults for ``torch_class`` (read from its signature)."""
    _check_supported(torch_class)
    signature = inspect.signature(torch_class.__init__)
    defaults = {}
    for name in hyperparameter_names(torch_class):
        default = signature.parameters[name].default
        if default is not inspect.Parameter.empty and type(default).__name__ != "_RequiredParameter":
            defaults[name] = tuple(default) if name == "betas" else default
    return defaults


def resolve(torch_class: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """Fill in torch's defaults and validate with torch.optim itself (same checks, same messages).

    >>> resolve(torch.optim.Adam, {"lr": 0.01})["betas"]
    (0.9, 0.999)
    """
    known = hyperparameter_names(torch_class)
    unknown = [k for k in values if k not in known and k not in _KERNEL_CHOICES]
    if unknown:
        raise ValueError(f"torch.optim.{torch_class.__name__} has no hyperparameter {unknown[0]!r} "
                         f"here; it takes: {', '.join(known)}.")
    resolved = torch_defaults(torch_class)
    resolved.update({k: _checked_value(torch_class, k, v) for k, v in values.items() if k in known})
    if "lr" not in resolved:
        raise ValueError(f"torch.optim.{torch_class.__name__} needs a learning rate: give lr=...")
    try:
        torch_class([torch.zeros(1, requires_grad=True)], **resolved)
    except (ValueError, TypeError) as error:
        raise ValueError(f"torch.optim.{torch_class.__name__}({_describe(resolved)}): {error}") from error
    return resolved


def _checked_value(torch_class: type, name: str, value: Any) -> Any:
    """A hyperparameter as a plain value: flags True or False, betas a pair of finite floats, the rest a
    finite number. torch.optim accepts ``lr=nan`` or ``inf``, which make every number of a learner NaN."""
    where = f"torch.optim.{torch_class.__name__} {name}"
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.item()
    if name in _STATIC[torch_class]:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be True or False; got {value!r}.")
        return value
    if name == "betas":
        if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_finite(b) for b in value)):
            raise ValueError(f"{where} must be a pair of finite numbers (beta1, beta2), e.g. betas=(0.9, 0.999); "
                             f"got {value!r}.")
        return tuple(float(b) for b in value)
    if not _finite(value):
        raise ValueError(f"{where} must be a finite number; got {value!r}.")
    return value


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def functional_twin(torch_class: type, varied: frozenset[str] = frozenset(), **values: Any) -> FunctionalOptimizer:
    """The functional optimizer that matches ``torch_class(params, **values)``'s structure; ``varied``
    names hyperparameters that interventions change during training (a momentum that may become non-zero
    needs SGD's momentum buffer)."""
    resolved = resolve(torch_class, values)
    flags = structure_key(torch_class, resolved, varied)
    if torch_class is torch.optim.SGD:
        twin = sgd(momentum_buffer=flags[1], nesterov=flags[2])
    else:
        twin = adam(amsgrad=flags[1], decoupled_weight_decay=torch_class is torch.optim.AdamW)
    return replace(twin, torch_class=torch_class)


def structure_key(torch_class: type, resolved: Mapping[str, Any], varied: frozenset[str] = frozenset()) -> tuple:
    """Learners with equal keys can share one vmapped update."""
    if torch_class is torch.optim.SGD:
        return ("SGD", resolved["momentum"] != 0 or "momentum" in varied, bool(resolved["nesterov"]))
    return (torch_class.__name__, bool(resolved["amsgrad"]))


def canonical(torch_class: type, resolved: Mapping[str, Any], varied: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The hyperparameters that decide the numbers, for learner ids: ``dampening`` is left out when
    momentum is 0 throughout (torch never reads it then).

    >>> canonical(torch.optim.SGD, resolve(torch.optim.SGD, {"lr": 0.1, "dampening": 0.5}))
    {'optimizer': 'SGD', 'lr': 0.1, 'momentum': 0.0, 'nesterov': False, 'weight_decay': 0.0}
    """
    out = {"optimizer": torch_class.__name__}
    for k in sorted(resolved):
        if k == "dampening" and resolved["momentum"] == 0 and "momentum" not in varied:
            continue
        v = resolved[k]
        out[k] = [float(b) for b in v] if isinstance(v, tuple) else (float(v) if isinstance(v, int | float) and
                                                                      not isinstance(v, bool) else v)
    return out


def numeric_hparams(torch_class: type, resolved: Mapping[str, Any]) -> dict[str, float]:
    """The per-learner numbers ``update`` reads, e.g. betas split into beta1 and beta2."""
    out = {k: float(resolved[k]) for k in _NUMERIC[torch_class] if k != "betas"}
    if "betas" in resolved:
        out["beta1"], out["beta2"] = resolved["betas"]
    return out
