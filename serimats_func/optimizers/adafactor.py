"""Adafactor (beta2_decay, eps = (eps1, eps2), d, weight decay), as ``torch.optim.Adafactor``: the second moment
of a matrix factored into row and column variances (over the last two dimensions), of a vector kept whole.

Its update reads norms of whole parameters, so it runs on the stacked leaves in their true shape (N, *shape).

>>> import torch
>>> opt = adafactor()
>>> params = {"w": torch.ones(2, 3, dtype=torch.float64)}
>>> params, state = opt.update({"w": torch.ones(2, 3, dtype=torch.float64)}, opt.init(params), params, opt.hparams(lr=0.01))
>>> round(params["w"][0, 0].item(), 6), state.row_var["w"].shape, state.col_var["w"].shape
(0.99, torch.Size([2, 1]), torch.Size([1, 3]))
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
    one_learner,
    per_learner,
    register_optimizer,
    standard_torch_state,
)


class AdafactorState(NamedTuple):
    """Adafactor's state for one learner (each leaf gets a leading learner axis N when stacked)."""

    step: torch.Tensor  # () float64: updates done
    row_var: Params  # name -> (..., R, 1) for parameters of 2 or more dimensions (..., R, C)
    col_var: Params  # name -> (..., 1, C)
    variance: Params  # name -> like the parameter, for vectors


def _matrix(p: torch.Tensor, stacked: bool) -> bool:
    return p.ndim - stacked > 1


def adafactor() -> FunctionalOptimizer:
    """Adafactor following torch.optim's single-tensor code (eps1 NaN: the parameter dtype's machine epsilon)."""

    def init(params: Params) -> AdafactorState:
        rows = {k: p.new_zeros((*p.shape[:-1], 1)) for k, p in params.items() if _matrix(p, False)}
        cols = {k: p.new_zeros((*p.shape[:-2], 1, p.shape[-1])) for k, p in params.items() if _matrix(p, False)}
        vectors = {k: torch.zeros_like(p) for k, p in params.items() if not _matrix(p, False)}
        return AdafactorState(torch.zeros((), dtype=HPARAM_DTYPE), rows, cols, vectors)

    def stacked(grads: Params, state: AdafactorState, params: Params, h: HParams) -> tuple[Params, AdafactorState]:
        step = state.step + 1  # (N,)
        lr, wd, d = h["lr"], h["weight_decay"], h["d"]
        one_minus_beta2_t = step ** h["beta2_decay"]
        rho_t = torch.minimum(lr, 1 / (step**0.5))
        new_params, rows, cols, vectors = {}, {}, {}, {}
        for name, p in params.items():  # (N, *shape)
            g, dims, numel = grads[name], tuple(range(1, p.ndim)), p[0].numel()
            eps1 = torch.where(torch.isnan(h["eps1"]), torch.finfo(p.dtype).eps, h["eps1"])  # (N,)
            alpha = torch.maximum(h["eps2"], torch.linalg.vector_norm(p, dim=dims).to(HPARAM_DTYPE) / numel**0.5) * rho_t
            p = p * per_learner(1 - lr * wd, p)
            w = per_learner(one_minus_beta2_t, p)
            if _matrix(p, True):
                row_mean = torch.linalg.vector_norm(g, dim=-1, keepdim=True).square() / g.size(-1)  # (N, ..., R, 1)
                col_mean = torch.linalg.vector_norm(g, dim=-2, keepdim=True).square() / g.size(-2)  # (N, ..., 1, C)
                rows[name] = torch.lerp(state.row_var[name], row_mean, w)
                cols[name] = torch.lerp(state.col_var[name], col_mean, w)
                var_estimate = rows[name] @ cols[name]
                var_estimate = var_estimate / torch.maximum(rows[name].mean(dim=-2, keepdim=True), per_learner(eps1, p))
            else:
                vectors[name] = var_estimate = torch.lerp(state.variance[name], g * g, w)
            update = torch.maximum(var_estimate, per_learner(eps1 * eps1, p)).rsqrt() * g
            denom = torch.clamp(torch.linalg.vector_norm(update, dim=dims).to(HPARAM_DTYPE) / (numel**0.5 * d), min=1.0)
            new_params[name] = p + per_learner(-alpha / denom, p) * update
        return new_params, AdafactorState(step, rows, cols, vectors)

    return FunctionalOptimizer("Adafactor", init, one_learner(stacked), ADAFACTOR.numeric_names(), ADAFACTOR, stacked)


ADAFACTOR = register_optimizer(OptimizerFamily(
    name="Adafactor", torch_class=torch.optim.Adafactor, numeric=("lr", "beta2_decay", "eps", "d", "weight_decay"),
    flags=(), split={"eps": ("eps1", "eps2")}, nullable=frozenset({"eps1"}), build=lambda resolved, varied: adafactor(),
    structure=lambda resolved, varied: ("Adafactor",), describe=lambda structure: "Adafactor",
    torch_state=standard_torch_state()))
