"""RAdam (betas, eps, weight decay, decoupled_weight_decay), as ``torch.optim.RAdam``.

>>> import torch
>>> opt = radam()
>>> params = {"w": torch.ones(2, dtype=torch.float64)}
>>> params, state = opt.update({"w": torch.ones(2, dtype=torch.float64)}, opt.init(params), params, opt.hparams(lr=0.1))
>>> [round(v, 6) for v in params["w"].tolist()], int(state.step)
([0.9, 0.9], 1)
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


class RAdamState(NamedTuple):
    """RAdam's state for one learner (each leaf gets a leading learner axis N when stacked)."""

    step: torch.Tensor  # () float64: updates done
    exp_avg: Params  # name -> like the parameter: first moment
    exp_avg_sq: Params  # name -> like the parameter: second moment


def radam(decoupled_weight_decay: bool = False) -> FunctionalOptimizer:
    """RAdam following torch.optim's single-tensor code: the rectified step where rho_t > 5, else plain momentum
    (chosen per learner with ``torch.where``)."""

    def init(params: Params) -> RAdamState:
        return RAdamState(torch.zeros((), dtype=HPARAM_DTYPE), zeros_like(params), zeros_like(params))

    def update(grads: Params, state: RAdamState, params: Params, h: HParams) -> tuple[Params, RAdamState]:
        step = state.step + 1
        lr, beta1, beta2, wd = h["lr"], h["beta1"], h["beta2"], h["weight_decay"]
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        rectified = rho_t > 5.0
        scalars = per_dtype(lambda dt: {"decay" if decoupled_weight_decay else "wd":
                                        ((1 - lr * wd) if decoupled_weight_decay else wd).to(dt),
                                        "w1": (1 - beta1).to(dt), "beta2": beta2.to(dt), "w2": (1 - beta2).to(dt),
                                        "bc1": bias_correction1.to(dt), "bc2_sqrt": (bias_correction2**0.5).to(dt),
                                        "eps": h["eps"].to(dt), "lr": lr.to(dt), "rect": rect.to(dt)})
        new_params, exp_avgs, exp_avg_sqs = {}, {}, {}
        for name, p in params.items():
            c, g = scalars(p.dtype), grads[name]
            if decoupled_weight_decay:
                p = p * c["decay"]
            else:
                g = g + p * c["wd"]
            exp_avgs[name] = torch.lerp(state.exp_avg[name], g, c["w1"])
            exp_avg_sqs[name] = state.exp_avg_sq[name] * c["beta2"] + c["w2"] * g * g
            corrected = exp_avgs[name] / c["bc1"]
            adaptive = c["bc2_sqrt"] / (exp_avg_sqs[name].sqrt() + c["eps"])
            new_params[name] = torch.where(rectified, p - corrected * c["lr"] * adaptive * c["rect"], p - corrected * c["lr"])
        return new_params, RAdamState(step, exp_avgs, exp_avg_sqs)

    return FunctionalOptimizer("RAdam", init, update, RADAM.numeric_names(), RADAM)


def _structure(resolved: Mapping[str, Any], varied: frozenset[str]) -> tuple:
    return ("RAdam", bool(resolved["decoupled_weight_decay"]))


RADAM = register_optimizer(OptimizerFamily(
    name="RAdam", torch_class=torch.optim.RAdam, numeric=("lr", "betas", "eps", "weight_decay"),
    flags=("decoupled_weight_decay",), split={"betas": ("beta1", "beta2")},
    build=lambda resolved, varied: radam(_structure(resolved, varied)[1]), structure=_structure,
    describe=lambda structure: "RAdam" + (" (decoupled weight decay)" if structure[1] else ""),
    torch_state=standard_torch_state()))
