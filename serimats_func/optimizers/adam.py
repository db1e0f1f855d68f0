"""Adam (L2 weight decay) and AdamW (decoupled weight decay), as ``torch.optim.Adam`` and ``AdamW``.

>>> import torch
>>> opt = adam()
>>> params = {"w": torch.ones(2, dtype=torch.float64)}
>>> values = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
>>> h = {k: torch.tensor(v, dtype=torch.float64) for k, v in values.items()}
>>> params, state = opt.update({"w": torch.ones(2, dtype=torch.float64)}, opt.init(params), params, h)
>>> [round(v, 6) for v in params["w"].tolist()], int(state.step)
([0.9, 0.9], 1)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .base import HPARAM_DTYPE, FunctionalOptimizer, HParams, OptimizerFamily, Params, per_dtype, register_optimizer, zeros_like


class AdamState(NamedTuple):
    """Adam's state for one learner (each leaf gets a leading learner axis N when stacked)."""

    step: torch.Tensor  # () float64: updates done
    exp_avg: Params  # name -> like the parameter: first moment
    exp_avg_sq: Params  # name -> like the parameter: second moment
    max_exp_avg_sq: Params  # name -> like the parameter, with amsgrad; else empty


def adam(amsgrad: bool = False, decoupled_weight_decay: bool = False) -> FunctionalOptimizer:
    """Adam or, with ``decoupled_weight_decay``, AdamW, following torch.optim's single-tensor code."""

    def init(params: Params) -> AdamState:
        return AdamState(torch.zeros((), dtype=HPARAM_DTYPE), zeros_like(params), zeros_like(params),
                         zeros_like(params) if amsgrad else {})

    def update(grads: Params, state: AdamState, params: Params, h: HParams) -> tuple[Params, AdamState]:
        step = state.step + 1
        lr, beta1, beta2, wd = h["lr"], h["beta1"], h["beta2"], h["weight_decay"]
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1
        new_params: Params = {}
        exp_avgs, exp_avg_sqs, maxima = {}, {}, {}
        scalars = per_dtype(lambda dt: {"decay" if decoupled_weight_decay else "wd":
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
            exp_avg = torch.lerp(state.exp_avg[name], g, c["w1"])
            exp_avg_sq = state.exp_avg_sq[name] * c["beta2"] + c["w2"] * g * g
            second = exp_avg_sq
            if amsgrad:
                second = torch.maximum(state.max_exp_avg_sq[name], exp_avg_sq)
                maxima[name] = second
            denom = second.sqrt() / c["bc2"] + c["eps"]
            new_params[name] = p + c["step"] * exp_avg / denom
            exp_avgs[name], exp_avg_sqs[name] = exp_avg, exp_avg_sq
        return new_params, AdamState(step, exp_avgs, exp_avg_sqs, maxima)

    family = ADAMW if decoupled_weight_decay else ADAM
    return FunctionalOptimizer(family.name, init, update, ("lr", "beta1", "beta2", "eps", "weight_decay"), family)


def _structure_of(name: str):
    def structure(resolved: Mapping[str, Any], varied: frozenset[str]) -> tuple:
        return (name, bool(resolved["amsgrad"]))

    return structure


def _builder(decoupled: bool):
    def build(resolved: Mapping[str, Any], varied: frozenset[str]) -> FunctionalOptimizer:
        return adam(amsgrad=bool(resolved["amsgrad"]), decoupled_weight_decay=decoupled)

    return build


def _describe(structure: tuple) -> str:
    name, amsgrad = structure
    return name + (" (amsgrad)" if amsgrad else "")


def _torch_state(opt: Mapping[str, torch.Tensor], param: Mapping[str, torch.Tensor]) -> dict | None:
    """torch holds no state before the first step; then ``step`` (a float32 tensor) and the moments."""
    step = float(opt["step"])
    if step <= 0:
        return None
    return {"step": torch.tensor(step, dtype=torch.float32), **{k: v.clone() for k, v in param.items()}}


def _family(name: str, torch_class: type, decoupled: bool) -> OptimizerFamily:
    return OptimizerFamily(name=name, torch_class=torch_class, numeric=("lr", "betas", "eps", "weight_decay"),
                           flags=("amsgrad",), split={"betas": ("beta1", "beta2")}, build=_builder(decoupled),
                           structure=_structure_of(name), describe=_describe, torch_state=_torch_state)


ADAM = register_optimizer(_family("Adam", torch.optim.Adam, decoupled=False))
ADAMW = register_optimizer(_family("AdamW", torch.optim.AdamW, decoupled=True))
