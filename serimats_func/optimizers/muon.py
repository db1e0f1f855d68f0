"""Muon (lr, weight decay, momentum, nesterov, eps; ns_coefficients, ns_steps, adjust_lr_fn), as ``torch.optim.Muon``.

Muon is an optimizer for matrices: torch's only takes 2-D parameters and says to train the others (biases,
norms, convolution kernels) with AdamW. So here the 2-D parameters train with Muon and every other parameter with
``torch.optim.AdamW(lr=3e-4)`` (torch's defaults otherwise: betas (0.9, 0.999), eps 1e-8, weight decay 0.01), as in
torch's own Muon example; ``load_learner`` gives such a learner back as a ``MuonWithAdamW``, which runs torch's Muon
and AdamW. The Newton-Schulz iterations (in bfloat16, as torch's) run for all learners at once, as batched matrix
products (``baddbmm``), which give each learner bitwise the numbers of torch's ``addmm``; ``ns_coefficients`` and
``ns_steps`` are structural (learners that differ in them train in separate groups).

>>> import torch
>>> opt = muon()
>>> params = {"w": torch.ones(2, 2, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
>>> grads = {"w": torch.eye(2, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
>>> params, state = opt.update(grads, opt.init(params), params, opt.hparams(lr=0.1, weight_decay=0.0))
>>> [round(v, 2) for v in params["w"].flatten().tolist()], sorted(state.momentum_buffer), sorted(state.exp_avg)
([0.89, 1.0, 1.0, 0.89], ['w'], ['b'])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from .adam import adam
from .base import (
    HPARAM_DTYPE,
    FunctionalOptimizer,
    HParams,
    OptimizerFamily,
    Params,
    one_learner,
    per_learner,
    register_optimizer,
)
from .groups import CombinedOptimizer

OTHERS = {"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}  # AdamW for non-matrix parameters


class MuonState(NamedTuple):
    """Muon's state for one learner (each leaf gets a leading learner axis N when stacked)."""

    step: torch.Tensor  # () float64: updates done
    momentum_buffer: Params  # name -> (A, B), for the 2-D parameters
    exp_avg: Params  # name -> like the parameter, for the others (AdamW)
    exp_avg_sq: Params  # name -> like the parameter, for the others (AdamW)


def _orthogonalize(g: torch.Tensor, coefficients: Sequence[float], steps: int, eps: torch.Tensor) -> torch.Tensor:
    """torch's ``_zeropower_via_newtonschulz`` of N matrices at once: g (N, A, B), eps (N,) -> bfloat16 (N, A, B)."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / torch.maximum(torch.linalg.vector_norm(x, dim=(1, 2)), eps.bfloat16()).reshape(-1, 1, 1)
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def _lr_ratio(adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """torch's ``_adjust_lr`` of a learning rate of 1 for a parameter of ``shape``."""
    A, B = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, A / B))
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(A, B))
    return math.sqrt(A / B) if adjust_lr_fn == "spectral_unclamped" else 1.0


def muon(nesterov: bool = True, ns_coefficients: Sequence[float] = (3.4445, -4.7750, 2.0315), ns_steps: int = 5,
         adjust_lr_fn: str | None = None) -> FunctionalOptimizer:
    """Muon for the 2-D parameters, following torch.optim's code; AdamW (``OTHERS``) for the rest."""
    others = adam(decoupled_weight_decay=True)
    others_h = {"lr": OTHERS["lr"], "beta1": OTHERS["betas"][0], "beta2": OTHERS["betas"][1], "eps": OTHERS["eps"],
                "weight_decay": OTHERS["weight_decay"]}

    def init(params: Params) -> MuonState:
        matrices = {k: torch.zeros_like(p) for k, p in params.items() if p.ndim == 2}
        rest = {k: torch.zeros_like(p) for k, p in params.items() if p.ndim != 2}
        return MuonState(torch.zeros((), dtype=HPARAM_DTYPE), matrices, rest, {k: torch.zeros_like(p) for k, p in rest.items()})

    def stacked(grads: Params, state: MuonState, params: Params, h: HParams) -> tuple[Params, MuonState]:
        lr, momentum = h["lr"], h["momentum"]  # (N,)
        new_params, buffers = {}, {}
        for name in state.momentum_buffer:
            p, g = params[name], grads[name]  # (N, A, B)
            buffers[name] = buf = torch.lerp(state.momentum_buffer[name], g, per_learner(1 - momentum, g))
            update = torch.lerp(g, buf, per_learner(momentum, g)) if nesterov else buf
            update = _orthogonalize(update, ns_coefficients, ns_steps, h["eps"])
            p = p * per_learner(1 - lr * h["weight_decay"], p)
            new_params[name] = p + per_learner(-(lr * _lr_ratio(adjust_lr_fn, p.shape[1:])), p) * update
        n = len(lr)
        rows = {k: params[k].reshape(n, -1) for k in state.exp_avg}  # (N, numel), as stacked_update gives AdamW
        moments = others.init(rows)._replace(step=state.step.reshape(n, 1),
                                             exp_avg={k: v.reshape(n, -1) for k, v in state.exp_avg.items()},
                                             exp_avg_sq={k: v.reshape(n, -1) for k, v in state.exp_avg_sq.items()})
        hparams = {k: torch.tensor(v, dtype=HPARAM_DTYPE, device=lr.device) for k, v in others_h.items()}
        rest, moments = others.update({k: grads[k].reshape(n, -1) for k in rows}, moments, rows, hparams)
        new_params.update({k: v.reshape(params[k].shape) for k, v in rest.items()})
        return new_params, MuonState(state.step + 1, buffers, {k: v.reshape(params[k].shape) for k, v in moments.exp_avg.items()},
                                     {k: v.reshape(params[k].shape) for k, v in moments.exp_avg_sq.items()})

    return FunctionalOptimizer("Muon", init, one_learner(stacked), MUON.numeric_names(), MUON, stacked)


class MuonWithAdamW(CombinedOptimizer):
    """``torch.optim.Muon`` over the matrices and ``torch.optim.AdamW(**OTHERS)`` over the other parameters, as one
    optimizer: its param_groups are Muon's then AdamW's, its state theirs. What ``load_learner`` gives back for a
    Muon learner whose model has parameters that are not matrices. ``matrices`` may be param groups (dicts), as
    torch.optim takes them.

    >>> layer = torch.nn.Linear(3, 2)
    >>> opt = MuonWithAdamW([layer.weight], [layer.bias], lr=0.02)
    >>> [g["lr"] for g in opt.param_groups]
    [0.02, 0.0003]
    """

    def __init__(self, matrices: Iterable[torch.Tensor] | Iterable[dict], others: Iterable[torch.Tensor], **muon: Any):
        self.muon = torch.optim.Muon(matrices, **muon)
        self.adamw = torch.optim.AdamW(others, foreach=False, **OTHERS)
        super().__init__([self.muon, self.adamw])


def _make_torch(groups: Sequence[tuple[Sequence[tuple[str, torch.Tensor]], Mapping[str, Any]]]) -> torch.optim.Optimizer:
    """torch's Muon over each group's matrices (one param group each) and, when some parameters are not matrices,
    AdamW(**OTHERS) over all of those."""
    matrices = [{"params": [p for _, p in named if p.ndim == 2], **settings} for named, settings in groups]
    matrices = [g for g in matrices if g["params"]]
    others = [p for named, _ in groups for _, p in named if p.ndim != 2]
    settings = groups[0][1]
    return MuonWithAdamW(matrices, others, **settings) if others else torch.optim.Muon(matrices, **settings)


def _torch_state(opt: Mapping[str, torch.Tensor], param: Mapping[str, torch.Tensor]) -> dict | None:
    """torch's Muon keeps a momentum buffer per matrix, AdamW its step and moments, from the first step."""
    if float(opt["step"]) <= 0:
        return None
    if "momentum_buffer" in param:
        return {"momentum_buffer": param["momentum_buffer"].clone()}
    return {"step": torch.tensor(float(opt["step"]), dtype=torch.float32), **{k: v.clone() for k, v in param.items()}}


def _structure(resolved: Mapping[str, Any], varied: frozenset[str]) -> tuple:
    return ("Muon", bool(resolved["nesterov"]), tuple(float(c) for c in resolved["ns_coefficients"]),
            int(resolved["ns_steps"]), resolved["adjust_lr_fn"])


def _describe(structure: tuple) -> str:
    _, nesterov, coefficients, steps, adjust = structure
    return (f"Muon ({'nesterov, ' if nesterov else ''}{steps} Newton-Schulz steps {coefficients}"
            f"{', lr ' + adjust if adjust else ''}; AdamW for non-matrix parameters)")


MUON = register_optimizer(OptimizerFamily(
    name="Muon", torch_class=torch.optim.Muon, numeric=("lr", "weight_decay", "momentum", "eps"), flags=("nesterov",),
    choices=("ns_coefficients", "ns_steps", "adjust_lr_fn"), probe_shape=(1, 1),
    build=lambda resolved, varied: muon(*_structure(resolved, varied)[1:]), structure=_structure, describe=_describe,
    torch_state=_torch_state, make_torch=_make_torch))
