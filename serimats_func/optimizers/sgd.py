"""SGD with momentum, dampening, nesterov and (L2) weight decay, as ``torch.optim.SGD``.

>>> import torch
>>> opt = sgd(momentum_buffer=True)
>>> params = {"w": torch.ones(3, dtype=torch.float64)}
>>> h = {k: torch.tensor(v, dtype=torch.float64) for k, v in dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0).items()}
>>> params, state = opt.update({"w": torch.ones(3, dtype=torch.float64)}, opt.init(params), params, h)
>>> params["w"].tolist(), state.momentum_buffer["w"].tolist(), bool(state.has_buffer)
([0.9, 0.9, 0.9], [1.0, 1.0, 1.0], True)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .base import HPARAM_DTYPE, FunctionalOptimizer, HParams, OptimizerFamily, Params, per_dtype, register_optimizer, zeros_like


class SGDState(NamedTuple):
    """SGD's state for one learner (each leaf gets a leading learner axis N when stacked)."""

    step: torch.Tensor  # () float64: updates done
    momentum_buffer: Params  # name -> like the parameter; empty without momentum
    has_buffer: torch.Tensor | tuple  # () bool: whether torch would hold a buffer yet (it starts at the first step
    #                                    whose momentum is not 0); () without momentum (no leaf: vmap takes no None)


def sgd(momentum_buffer: bool = False, nesterov: bool = False) -> FunctionalOptimizer:
    """SGD as ``torch.optim.SGD``. With ``momentum_buffer``, the state keeps torch's buffer and whether it exists
    yet: torch starts the buffer at the first step whose momentum is not 0 (``buf = d_p``), and a step with
    momentum 0 uses the plain gradient and leaves the buffer alone, so momentum may change between steps exactly
    as it can in ``optimizer.param_groups``."""

    def init(params: Params) -> SGDState:
        step = torch.zeros((), dtype=HPARAM_DTYPE)
        if not momentum_buffer:
            return SGDState(step, {}, ())
        return SGDState(step, zeros_like(params), torch.zeros((), dtype=torch.bool))

    def update(grads: Params, state: SGDState, params: Params, h: HParams) -> tuple[Params, SGDState]:
        new_params, new_buffers = {}, {}
        if momentum_buffer:
            uses_momentum = h["momentum"] != 0
            fresh = ~state.has_buffer
        scalars = per_dtype(lambda dt: {"wd": h["weight_decay"].to(dt), "m": h["momentum"].to(dt),
                                        "keep": (1 - h["dampening"]).to(dt), "step": (-h["lr"]).to(dt)})
        for name, p in params.items():
            c = scalars(p.dtype)
            d_p = grads[name] + p * c["wd"]
            if momentum_buffer:
                m = c["m"]
                old = state.momentum_buffer[name]
                later = old * m + d_p * c["keep"]
                buf = torch.where(fresh, d_p, later)  # torch starts the buffer at d_p
                new_buffers[name] = torch.where(uses_momentum, buf, old)
                with_momentum = d_p + buf * m if nesterov else buf
                d_p = torch.where(uses_momentum, with_momentum, d_p)
            new_params[name] = p + c["step"] * d_p
        if not momentum_buffer:
            return new_params, SGDState(state.step + 1, {}, ())
        return new_params, SGDState(state.step + 1, new_buffers, state.has_buffer | uses_momentum)

    return FunctionalOptimizer("SGD", init, update, ("lr", "momentum", "dampening", "weight_decay"), SGD)


def _structure(resolved: Mapping[str, Any], varied: frozenset[str]) -> tuple:
    return ("SGD", resolved["momentum"] != 0 or "momentum" in varied, bool(resolved["nesterov"]))


def _build(resolved: Mapping[str, Any], varied: frozenset[str]) -> FunctionalOptimizer:
    _, momentum, nesterov = _structure(resolved, varied)
    return sgd(momentum_buffer=momentum, nesterov=nesterov)


def _describe(structure: tuple) -> str:
    _, momentum, nesterov = structure
    return "SGD" + (" with momentum" if momentum else "") + (", nesterov" if nesterov else "")


def _torch_state(opt: Mapping[str, torch.Tensor], param: Mapping[str, torch.Tensor]) -> dict | None:
    """torch keeps a momentum buffer once a step with momentum has run."""
    if "has_buffer" in opt and bool(opt["has_buffer"]):
        return {"momentum_buffer": param["momentum_buffer"].clone()}
    return None


def _skip(resolved: Mapping[str, Any], varied: frozenset[str]) -> frozenset[str]:
    """``dampening`` is left out of ids when momentum is 0 throughout: torch never reads it then."""
    return frozenset({"dampening"}) if resolved["momentum"] == 0 and "momentum" not in varied else frozenset()


SGD = register_optimizer(OptimizerFamily(
    name="SGD", torch_class=torch.optim.SGD, numeric=("lr", "momentum", "dampening", "weight_decay"),
    flags=("nesterov",), build=_build, structure=_structure, describe=_describe, torch_state=_torch_state,
    skip_in_identity=_skip))
