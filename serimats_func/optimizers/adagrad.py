"""Adagrad (lr_decay, weight decay, initial_accumulator_value, eps), as ``torch.optim.Adagrad``.

>>> import torch
>>> opt = adagrad()
>>> params = {"w": torch.ones(2, dtype=torch.float64)}
>>> h = opt.hparams(lr=0.1, initial_accumulator_value=3.0)
>>> params, state = opt.update({"w": torch.ones(2, dtype=torch.float64)}, opt.init(params), params, h)
>>> [round(v, 6) for v in params["w"].tolist()], state.sum["w"].tolist()
([0.95, 0.95], [4.0, 4.0])
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


class AdagradState(NamedTuple):
    """Adagrad's state for one learner (each leaf gets a leading learner axis N when stacked)."""

    step: torch.Tensor  # () float64: updates done
    sum: Params  # name -> like the parameter: the sum of squared gradients (before the first step: 0, read as
    #               initial_accumulator_value, which torch puts there when the optimizer is built)


def adagrad() -> FunctionalOptimizer:
    """Adagrad following torch.optim's single-tensor code (dense gradients)."""

    def init(params: Params) -> AdagradState:
        return AdagradState(torch.zeros((), dtype=HPARAM_DTYPE), zeros_like(params))

    def update(grads: Params, state: AdagradState, params: Params, h: HParams) -> tuple[Params, AdagradState]:
        step = state.step + 1
        clr = h["lr"] / (1 + (step - 1) * h["lr_decay"])
        fresh = state.step == 0  # torch's sum starts at initial_accumulator_value
        scalars = per_dtype(lambda dt: {"wd": h["weight_decay"].to(dt), "start": h["initial_accumulator_value"].to(dt),
                                        "eps": h["eps"].to(dt), "step": (-clr).to(dt)})
        new_params, sums = {}, {}
        for name, p in params.items():
            c = scalars(p.dtype)
            g = grads[name] + p * c["wd"]
            sums[name] = torch.where(fresh, c["start"], state.sum[name]) + g * g
            new_params[name] = p + c["step"] * (g / (sums[name].sqrt() + c["eps"]))
        return new_params, AdagradState(step, sums)

    return FunctionalOptimizer("Adagrad", init, update, ADAGRAD.numeric_names(), ADAGRAD)


ADAGRAD = register_optimizer(OptimizerFamily(
    name="Adagrad", torch_class=torch.optim.Adagrad, numeric=("lr", "lr_decay", "weight_decay", "initial_accumulator_value",
                                                              "eps"),
    flags=(), build=lambda resolved, varied: adagrad(), structure=lambda resolved, varied: ("Adagrad",),
    describe=lambda structure: "Adagrad", torch_state=standard_torch_state()))
