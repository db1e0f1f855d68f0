"""Adadelta (lr, rho, eps, weight decay), as ``torch.optim.Adadelta``.

>>> import torch
>>> opt = adadelta()
>>> params = {"w": torch.ones(2, dtype=torch.float64)}
>>> params, state = opt.update({"w": torch.ones(2, dtype=torch.float64)}, opt.init(params), params, opt.hparams(lr=1.0))
>>> [round(v, 6) for v in params["w"].tolist()], [round(v, 6) for v in state.square_avg["w"].tolist()]
([0.996838, 0.996838], [0.1, 0.1])
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


class AdadeltaState(NamedTuple):
    """Adadelta's state for one learner (each leaf gets a leading learner axis N when stacked)."""

    step: torch.Tensor  # () float64: updates done
    square_avg: Params  # name -> like the parameter: running average of squared gradients
    acc_delta: Params  # name -> like the parameter: running average of squared updates


def adadelta() -> FunctionalOptimizer:
    """Adadelta following torch.optim's single-tensor code."""

    def init(params: Params) -> AdadeltaState:
        return AdadeltaState(torch.zeros((), dtype=HPARAM_DTYPE), zeros_like(params), zeros_like(params))

    def update(grads: Params, state: AdadeltaState, params: Params, h: HParams) -> tuple[Params, AdadeltaState]:
        rho = h["rho"]
        scalars = per_dtype(lambda dt: {"wd": h["weight_decay"].to(dt), "rho": rho.to(dt), "w": (1 - rho).to(dt),
                                        "eps": h["eps"].to(dt), "step": (-h["lr"]).to(dt)})
        new_params, squares, deltas = {}, {}, {}
        for name, p in params.items():
            c = scalars(p.dtype)
            g = grads[name] + p * c["wd"]
            squares[name] = state.square_avg[name] * c["rho"] + c["w"] * g * g
            std = (squares[name] + c["eps"]).sqrt()
            delta = (state.acc_delta[name] + c["eps"]).sqrt() / std * g
            deltas[name] = state.acc_delta[name] * c["rho"] + c["w"] * delta * delta
            new_params[name] = p + c["step"] * delta
        return new_params, AdadeltaState(state.step + 1, squares, deltas)

    return FunctionalOptimizer("Adadelta", init, update, ADADELTA.numeric_names(), ADADELTA)


ADADELTA = register_optimizer(OptimizerFamily(
    name="Adadelta", torch_class=torch.optim.Adadelta, numeric=("lr", "rho", "eps", "weight_decay"), flags=(),
    build=lambda resolved, varied: adadelta(), structure=lambda resolved, varied: ("Adadelta",),
    describe=lambda structure: "Adadelta", torch_state=standard_torch_state()))
