"""RMSprop (alpha, eps, weight decay, momentum, centered), as ``torch.optim.RMSprop``.

>>> import torch
>>> opt = rmsprop()
>>> params = {"w": torch.ones(2, dtype=torch.float64)}
>>> h = opt.hparams(lr=0.01)
>>> params, state = opt.update({"w": torch.ones(2, dtype=torch.float64)}, opt.init(params), params, h)
>>> [round(v, 4) for v in params["w"].tolist()], [round(v, 6) for v in state.square_avg["w"].tolist()]
([0.9, 0.9], [0.01, 0.01])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .base import (
    HPARAM_DTYPE,
    FunctionalOptimizer,
    HParams,
    OptimizerFamily,
    Params,
    per_dtype,
    register_optimizer,
    standard_torch_state,
    zeros_like,
)


class RMSpropState(NamedTuple):
    """RMSprop's state for one learner (each leaf gets a leading learner axis N when stacked)."""

    step: torch.Tensor  # () float64: updates done
    square_avg: Params  # name -> like the parameter
    momentum_buffer: Params  # name -> like the parameter, with momentum; else empty
    grad_avg: Params  # name -> like the parameter, when centered; else empty


def rmsprop(momentum_buffer: bool = False, centered: bool = False) -> FunctionalOptimizer:
    """RMSprop following torch.optim's single-tensor code. With ``momentum_buffer`` a step whose momentum is 0
    uses the plain step and leaves the buffer alone, as torch's ``if momentum > 0`` does."""

    def init(params: Params) -> RMSpropState:
        return RMSpropState(torch.zeros((), dtype=HPARAM_DTYPE), zeros_like(params),
                            zeros_like(params) if momentum_buffer else {}, zeros_like(params) if centered else {})

    def update(grads: Params, state: RMSpropState, params: Params, h: HParams) -> tuple[Params, RMSpropState]:
        alpha = h["alpha"]
        scalars = per_dtype(lambda dt: {"wd": h["weight_decay"].to(dt), "alpha": alpha.to(dt), "w": (1 - alpha).to(dt),
                                        "eps": h["eps"].to(dt), "m": h["momentum"].to(dt), "step": (-h["lr"]).to(dt)})
        new_params, squares, buffers, averages = {}, {}, {}, {}
        for name, p in params.items():
            c = scalars(p.dtype)
            g = grads[name] + p * c["wd"]
            square_avg = state.square_avg[name] * c["alpha"] + c["w"] * g * g
            if centered:
                averages[name] = torch.lerp(state.grad_avg[name], g, c["w"])
                avg = (square_avg - averages[name] * averages[name]).sqrt() + c["eps"]
            else:
                avg = square_avg.sqrt() + c["eps"]
            plain = p + c["step"] * (g / avg)
            if momentum_buffer:
                uses = c["m"] > 0
                buf = state.momentum_buffer[name] * c["m"] + g / avg
                buffers[name] = torch.where(uses, buf, state.momentum_buffer[name])
                plain = torch.where(uses, p + c["step"] * buf, plain)
            new_params[name], squares[name] = plain, square_avg
        return new_params, RMSpropState(state.step + 1, squares, buffers, averages)

    return FunctionalOptimizer("RMSprop", init, update, RMSPROP.numeric_names(), RMSPROP)


def _structure(resolved: Mapping[str, Any], varied: frozenset[str]) -> tuple:
    """torch keeps a momentum buffer when momentum is above 0 at the first step (here also when it is varied)."""
    return ("RMSprop", resolved["momentum"] > 0 or "momentum" in varied, bool(resolved["centered"]))


def _describe(structure: tuple) -> str:
    _, momentum, centered = structure
    return "RMSprop" + (" with momentum" if momentum else "") + (", centered" if centered else "")


RMSPROP = register_optimizer(OptimizerFamily(
    name="RMSprop", torch_class=torch.optim.RMSprop, numeric=("lr", "alpha", "eps", "weight_decay", "momentum"),
    flags=("centered",), build=lambda resolved, varied: rmsprop(*_structure(resolved, varied)[1:]), structure=_structure,
    describe=_describe, torch_state=standard_torch_state()))
