"""Functional twins of ``torch.optim.lr_scheduler``'s schedulers, one registry of them (see ``base``): each a
pure function of the step, with its numeric arguments per learner.

>>> import torch
>>> sorted(REGISTRY)[:3]
['ConstantLR', 'CosineAnnealingLR', 'CosineAnnealingWarmRestarts']
>>> family_of(torch.optim.lr_scheduler.CosineAnnealingLR).resolve({"T_max": 100})
{'T_max': 100, 'eta_min': 0.0}
"""

from . import cosine, decay, linear, one_cycle  # noqa: F401  (each registers its families)
from .base import REGISTRY, WARMUP_START, ScheduleFamily, build_torch, family_of, register_schedule, scheduled_lr

__all__ = ["REGISTRY", "WARMUP_START", "ScheduleFamily", "build_torch", "family_of", "register_schedule", "scheduled_lr"]
