"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), which torch.optim lacks: ``Lion``, a
``torch.optim.Optimizer``, and its functional twin. Per step, with gradient g and momentum m:
``c = beta1 * m + (1 - beta1) * g``; ``p = p * (1 - lr * wd) - lr * sign(c)`` (decoupled weight decay);
``m = beta2 * m + (1 - beta2) * g``.

>>> import torch
>>> w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
>>> opt = Lion([w], lr=0.1)
>>> w.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
>>> opt.step()
>>> w.tolist(), [round(v, 6) for v in opt.state[w]["exp_avg"].tolist()]
([0.9, 1.1], [0.01, -0.01])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from .base import HPARAM_DTYPE, FunctionalOptimizer, HParams, OptimizerFamily, Params, per_dtype, register_optimizer, zeros_like


class Lion(torch.optim.Optimizer):
    """Lion as a plain torch.optim optimizer: ``Optimizer(Lion, lr=3e-4)`` names it in an experiment."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-4,
                 betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid beta parameters: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg, g = state["exp_avg"], p.grad
                c = exp_avg * beta1 + g * (1 - beta1)
                p.mul_(1 - lr * wd).add_(c.sign() * -lr)
                exp_avg.mul_(beta2).add_(g * (1 - beta2))
        return loss


class LionState(NamedTuple):
    """Lion's state for one learner (each leaf gets a leading learner axis N when stacked)."""

    step: torch.Tensor  # () float64: updates done
    exp_avg: Params  # name -> like the parameter: the momentum


def lion() -> FunctionalOptimizer:
    """The functional twin of ``Lion``: the same operations, with per-learner numbers."""

    def init(params: Params) -> LionState:
        return LionState(torch.zeros((), dtype=HPARAM_DTYPE), zeros_like(params))

    def update(grads: Params, state: LionState, params: Params, h: HParams) -> tuple[Params, LionState]:
        beta1, beta2 = h["beta1"], h["beta2"]
        scalars = per_dtype(lambda dt: {"beta1": beta1.to(dt), "w1": (1 - beta1).to(dt), "beta2": beta2.to(dt),
                                        "w2": (1 - beta2).to(dt), "decay": (1 - h["lr"] * h["weight_decay"]).to(dt),
                                        "step": (-h["lr"]).to(dt)})
        new_params, exp_avgs = {}, {}
        for name, p in params.items():
            c, g, m = scalars(p.dtype), grads[name], state.exp_avg[name]
            new_params[name] = p * c["decay"] + (m * c["beta1"] + g * c["w1"]).sign() * c["step"]
            exp_avgs[name] = m * c["beta2"] + g * c["w2"]
        return new_params, LionState(state.step + 1, exp_avgs)

    return FunctionalOptimizer("Lion", init, update, LION.numeric_names(), LION)


def _torch_state(opt: dict, param: dict) -> dict | None:
    return {"exp_avg": param["exp_avg"].clone()} if float(opt["step"]) > 0 else None


LION = register_optimizer(OptimizerFamily(
    name="Lion", torch_class=Lion, numeric=("lr", "betas", "weight_decay"), flags=(), split={"betas": ("beta1", "beta2")},
    build=lambda resolved, varied: lion(), structure=lambda resolved, varied: ("Lion",), describe=lambda structure: "Lion",
    torch_state=_torch_state))
