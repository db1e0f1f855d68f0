"""NAdam (betas, eps, weight decay, momentum_decay, decoupled_weight_decay), as ``torch.optim.NAdam``.

>>> import torch
>>> opt = nadam()
>>> params = {"w": torch.ones(2, dtype=torch.float64)}
>>> params, state = opt.update({"w": torch.ones(2, dtype=torch.float64)}, opt.init(params), params, opt.hparams(lr=0.1))
>>> [round(v, 4) for v in params["w"].tolist()], round(float(state.mu_product), 6)
([0.8944, 0.8944], 0.450073)
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


class NAdamState(NamedTuple):
    """NAdam's state for one learner (each leaf gets a leading learner axis N when stacked)."""

    step: torch.Tensor  # () float64: updates done
    mu_product: torch.Tensor  # () float32, as torch keeps it (its scalar dtype): the product of the momentum factors
    exp_avg: Params  # name -> like the parameter: first moment
    exp_avg_sq: Params  # name -> like the parameter: second moment


def nadam(decoupled_weight_decay: bool = False) -> FunctionalOptimizer:
    """NAdam following torch.optim's single-tensor code (``mu_product`` a float32 tensor, read back as a float)."""

    def init(params: Params) -> NAdamState:
        return NAdamState(torch.zeros((), dtype=HPARAM_DTYPE), torch.ones((), dtype=torch.float32), zeros_like(params),
                          zeros_like(params))

    def update(grads: Params, state: NAdamState, params: Params, h: HParams) -> tuple[Params, NAdamState]:
        step = state.step + 1
        lr, beta1, beta2, wd, decay = h["lr"], h["beta1"], h["beta2"], h["weight_decay"], h["momentum_decay"]
        bias_correction2 = 1 - beta2**step
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * decay)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * decay)))
        mu_product = state.mu_product * mu.to(torch.float32)
        product = mu_product.to(HPARAM_DTYPE)
        grad_step = -lr * (1.0 - mu) / (1.0 - product)
        avg_step = (-lr * mu_next) / (1.0 - product * mu_next)
        scalars = per_dtype(lambda dt: {"decay" if decoupled_weight_decay else "wd":
                                        ((1 - lr * wd) if decoupled_weight_decay else wd).to(dt),
                                        "w1": (1 - beta1).to(dt), "beta2": beta2.to(dt), "w2": (1 - beta2).to(dt),
                                        "bc2": bias_correction2.to(dt), "eps": h["eps"].to(dt),
                                        "grad": grad_step.to(dt), "avg": avg_step.to(dt)})
        new_params, exp_avgs, exp_avg_sqs = {}, {}, {}
        for name, p in params.items():
            c, g = scalars(p.dtype), grads[name]
            if decoupled_weight_decay:
                p = p * c["decay"]
            else:
                g = g + p * c["wd"]
            exp_avgs[name] = torch.lerp(state.exp_avg[name], g, c["w1"])
            exp_avg_sqs[name] = state.exp_avg_sq[name] * c["beta2"] + c["w2"] * g * g
            denom = (exp_avg_sqs[name] / c["bc2"]).sqrt() + c["eps"]
            p = p + c["grad"] * (g / denom)
            new_params[name] = p + c["avg"] * (exp_avgs[name] / denom)
        return new_params, NAdamState(step, mu_product, exp_avgs, exp_avg_sqs)

    return FunctionalOptimizer("NAdam", init, update, NADAM.numeric_names(), NADAM)


def _structure(resolved: Mapping[str, Any], varied: frozenset[str]) -> tuple:
    return ("NAdam", bool(resolved["decoupled_weight_decay"]))


NADAM = register_optimizer(OptimizerFamily(
    name="NAdam", torch_class=torch.optim.NAdam, numeric=("lr", "betas", "eps", "weight_decay", "momentum_decay"),
    flags=("decoupled_weight_decay",), split={"betas": ("beta1", "beta2")},
    build=lambda resolved, varied: nadam(_structure(resolved, varied)[1]), structure=_structure,
    describe=lambda structure: "NAdam" + (" (decoupled weight decay)" if structure[1] else ""),
    torch_state=standard_torch_state("mu_product")))
