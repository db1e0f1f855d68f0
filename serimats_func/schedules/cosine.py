"""Cosine annealing from the optimizer's lr down to ``eta_min`` over ``T_max`` updates (``CosineAnnealingLR``,
which goes back up after ``T_max``, as torch's does), and with warm restarts after ``T_0``, ``T_0 * T_mult``, ...
updates (``CosineAnnealingWarmRestarts``), as in ``torch.optim.lr_scheduler``.

>>> import torch
>>> base, n = torch.tensor(1.0, dtype=torch.float64), {"T_0": torch.tensor(2), "T_mult": torch.tensor(2),
...                                                    "eta_min": torch.tensor(0.0, dtype=torch.float64)}
>>> [round(float(WARM_RESTARTS.lr(base, torch.tensor(t), n, {})), 3) for t in range(8)]
[1.0, 0.5, 1.0, 0.854, 0.5, 0.146, 1.0, 0.962]
"""

from __future__ import annotations

import math

import torch

from .base import ScheduleFamily, register_schedule


def _cosine(base, eta_min, position):  # eta_min + (base - eta_min) * (1 + cos(pi * position)) / 2
    return eta_min + (base - eta_min) * (1 + torch.cos(math.pi * position)) / 2


def _annealing(base, t, n, flags):
    return _cosine(base, n["eta_min"], t.double() / n["T_max"])


def _restart_start(t0, m, k):
    """The update at which the k-th period starts when periods grow by m > 1: T_0 (m^k - 1) / (m - 1)."""
    return t0 * (m ** k - 1) // torch.clamp(m - 1, min=1)


def _warm_restarts(base, t, n, flags):
    """The position within the current period, counted in integers as torch's ``step()`` counts it."""
    t0, m = n["T_0"], n["T_mult"]
    grows = m > 1
    mm = torch.where(grows, m, 2)
    estimate = torch.floor(torch.log(t.double() / t0 * (mm - 1) + 1) / torch.log(mm.double())).long().clamp(min=0)
    k = torch.where(_restart_start(t0, mm, estimate) > t, estimate - 1, estimate).clamp(min=0)  # float log, exact ints
    k = torch.where(_restart_start(t0, mm, k + 1) <= t, k + 1, k)
    t_cur = torch.where(grows, t - _restart_start(t0, mm, k), torch.remainder(t, t0))
    t_i = torch.where(grows, t0 * mm ** k, t0)
    return _cosine(base, n["eta_min"], t_cur.double() / t_i)


def _refuse_annealing(resolved):
    if resolved["T_max"] <= 0:
        raise ValueError(f"torch.optim.lr_scheduler.CosineAnnealingLR T_max must be a positive integer; "
                         f"got {resolved['T_max']!r}.")


ANNEALING = register_schedule(ScheduleFamily(torch.optim.lr_scheduler.CosineAnnealingLR, _annealing,
                                             integers=("T_max",), floats=("eta_min",), refuse=_refuse_annealing))
WARM_RESTARTS = register_schedule(ScheduleFamily(torch.optim.lr_scheduler.CosineAnnealingWarmRestarts, _warm_restarts,
                                                 integers=("T_0", "T_mult"), floats=("eta_min",)))
