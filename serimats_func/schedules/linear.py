"""Schedules over the first ``total_iters`` updates: a linear change of factor from ``start_factor`` to
``end_factor`` (``LinearLR``), a constant ``factor`` (``ConstantLR``), a polynomial decay to 0 of degree ``power``
(``PolynomialLR``); after ``total_iters`` each holds its last value, as in ``torch.optim.lr_scheduler``.

>>> import torch
>>> base, n = torch.tensor(1.0, dtype=torch.float64), {"total_iters": torch.tensor(4), "power": torch.tensor(2.0)}
>>> [float(POLYNOMIAL.lr(base, torch.tensor(t), n, {})) for t in range(6)]
[1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
"""

from __future__ import annotations

import torch

from .base import ScheduleFamily, register_schedule


def _done(t, n):  # min(t, total_iters) / total_iters
    return torch.minimum(t, n["total_iters"]).double() / n["total_iters"]


def _linear(base, t, n, flags):
    return base * (n["start_factor"] + (n["end_factor"] - n["start_factor"]) * _done(t, n))


def _constant(base, t, n, flags):
    return base * torch.where(t < n["total_iters"], n["factor"], 1.0)


def _polynomial(base, t, n, flags):
    return base * (1.0 - _done(t, n)) ** n["power"]


def _refuse(name: str, factor: str | None = None):
    def refuse(resolved):
        if resolved["total_iters"] < 1:
            raise ValueError(f"torch.optim.lr_scheduler.{name} total_iters must be at least 1; got "
                             f"{resolved['total_iters']!r}.")
        if factor is not None and resolved[factor] == 0:  # torch divides by it at total_iters
            raise ValueError(f"torch.optim.lr_scheduler.{name} {factor} must be in (0, 1]; got 0.")
    return refuse


LINEAR = register_schedule(ScheduleFamily(torch.optim.lr_scheduler.LinearLR, _linear, integers=("total_iters",),
                                          floats=("start_factor", "end_factor"), refuse=_refuse("LinearLR")))
CONSTANT = register_schedule(ScheduleFamily(torch.optim.lr_scheduler.ConstantLR, _constant, integers=("total_iters",),
                                            floats=("factor",), refuse=_refuse("ConstantLR", "factor")))
POLYNOMIAL = register_schedule(ScheduleFamily(torch.optim.lr_scheduler.PolynomialLR, _polynomial,
                                              integers=("total_iters",), floats=("power",), refuse=_refuse("PolynomialLR")))
