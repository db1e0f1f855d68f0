"""Adamax (betas, eps, weight decay), as ``torch.optim.Adamax``.

>>> import torch
>>> opt = adamax()
>>> params = {"w": torch.ones(2, dtype=torch.float64)}
>>> params, state = opt.update({"w": torch.ones(2, dtype=torch.float64)}, opt.init(params), params, opt.hparams(lr=0.1))
>>> [round(v, 6) for v in params["w"].tolist()], [round(v, 6) for v in state.exp_inf["w"].tolist()]
([0.9, 0.9], [1.0, 1.0])
"""

from __future__ import annotations

from typing import NamedTuple

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


class AdamaxState(NamedTuple):
    """Adamax's state for one learner (each leaf gets a leading learner axis N when stacked)."""

    step: torch.Tensor  # () float64: updates done
    exp_avg: Params  # name -> like the parameter: first moment
    exp_inf: Params  # name -> like the parameter: exponentially weighted infinity norm


def adamax() -> FunctionalOptimizer:
    """Adamax following torch.optim's single-tensor code."""

    def init(params: Params) -> AdamaxState:
        return AdamaxState(torch.zeros((), dtype=HPARAM_DTYPE), zeros_like(params), zeros_like(params))

    def update(grads: Params, state: AdamaxState, params: Params, h: HParams) -> tuple[Params, AdamaxState]:
        step = state.step + 1
        beta1, beta2 = h["beta1"], h["beta2"]
        clr = h["lr"] / (1 - beta1**step)
        scalars = per_dtype(lambda dt: {"wd": h["weight_decay"].to(dt), "w1": (1 - beta1).to(dt), "beta2": beta2.to(dt),
                                        "eps": h["eps"].to(dt), "step": (-clr).to(dt)})
        new_params, exp_avgs, exp_infs = {}, {}, {}
        for name, p in params.items():
            c = scalars(p.dtype)
            g = grads[name] + p * c["wd"]
            exp_avgs[name] = torch.lerp(state.exp_avg[name], g, c["w1"])
            exp_infs[name] = torch.maximum(state.exp_inf[name] * c["beta2"], g.abs() + c["eps"])
            new_params[name] = p + c["step"] * (exp_avgs[name] / exp_infs[name])
        return new_params, AdamaxState(step, exp_avgs, exp_infs)

    return FunctionalOptimizer("Adamax", init, update, ADAMAX.numeric_names(), ADAMAX)


ADAMAX = register_optimizer(OptimizerFamily(
    name="Adamax", torch_class=torch.optim.Adamax, numeric=("lr", "betas", "eps", "weight_decay"), flags=(),
    split={"betas": ("beta1", "beta2")}, build=lambda resolved, varied: adamax(),
    structure=lambda resolved, varied: ("Adamax",), describe=lambda structure: "Adamax",
    torch_state=standard_torch_state()))
