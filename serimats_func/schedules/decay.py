"""Schedules that multiply the learning rate by ``gamma``: every ``step_size`` updates (``StepLR``), at each of
``milestones`` (``MultiStepLR``), at every update (``ExponentialLR``), as in ``torch.optim.lr_scheduler``.

>>> import torch
>>> base, n = torch.tensor(1.0, dtype=torch.float64), {"milestones": torch.tensor([2, 4]), "gamma": torch.tensor(0.5)}
>>> [float(MULTI_STEP.lr(base, torch.tensor(t), n, {})) for t in range(6)]
[1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
"""

from __future__ import annotations

import torch

from .base import ScheduleFamily, register_schedule


def _step(base, t, n, flags):  # base * gamma ** (t // step_size)
    return base * n["gamma"] ** torch.div(t, n["step_size"], rounding_mode="floor")


def _multi_step(base, t, n, flags):  # base * gamma ** (number of milestones <= t); a repeated milestone counts twice
    return base * n["gamma"] ** (n["milestones"] <= t).sum()


def _exponential(base, t, n, flags):
    return base * n["gamma"] ** t


def _positive(name: str, *arguments: str):
    def refuse(resolved):
        for k in arguments:
            if resolved[k] <= 0:
                raise ValueError(f"torch.optim.lr_scheduler.{name} {k} must be a positive integer; got {resolved[k]!r}.")
    return refuse


STEP = register_schedule(ScheduleFamily(torch.optim.lr_scheduler.StepLR, _step, integers=("step_size",),
                                        floats=("gamma",), refuse=_positive("StepLR", "step_size")))
MULTI_STEP = register_schedule(ScheduleFamily(torch.optim.lr_scheduler.MultiStepLR, _multi_step, floats=("gamma",),
                                              lists=("milestones",)))
EXPONENTIAL = register_schedule(ScheduleFamily(torch.optim.lr_scheduler.ExponentialLR, _exponential, floats=("gamma",)))
