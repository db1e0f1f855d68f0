"""The 1cycle policy (``OneCycleLR``): the lr rises from ``max_lr / div_factor`` to ``max_lr`` over the first
``pct_start`` of ``total_steps`` updates, then falls to ``max_lr / div_factor / final_div_factor`` (with
``three_phase``, it falls back to the start first), by cosine or linear annealing; with ``cycle_momentum`` the
momentum (beta1 for optimizers with betas) moves the other way, between ``max_momentum`` and ``base_momentum``.
The lr is ``max_lr``'s, not the optimizer's. Beyond ``total_steps``, where torch's scheduler raises, the lr and
momentum stay at their values at ``total_steps``.

>>> import torch
>>> n = {"max_lr": torch.tensor(1.0, dtype=torch.float64), "total_steps": torch.tensor(10), "pct_start": torch.tensor(0.3),
...      "div_factor": torch.tensor(10.0), "final_div_factor": torch.tensor(100.0)}
>>> [round(float(ONE_CYCLE.lr(None, torch.tensor(t), n, {"anneal_strategy": "linear", "three_phase": False})), 3)
...  for t in (0, 1, 2, 9)]
[0.1, 0.55, 1.0, 0.001]
"""

from __future__ import annotations

import math

import torch

from .base import ScheduleFamily, register_schedule


def _phases(n, flags) -> list[tuple[torch.Tensor, str, str]]:
    """(end step, start, end) of each phase, the start and end named ``initial``, ``max``, ``min``; momentum moves
    from ``max`` to ``base`` where the lr moves from ``initial`` to ``max``, and back."""
    total = n["total_steps"].double()
    first = n["pct_start"] * total - 1
    if flags["three_phase"]:
        return [(first, "initial", "max"), (2 * n["pct_start"] * total - 2, "max", "initial"), (total - 1, "initial", "min")]
    return [(first, "initial", "max"), (total - 1, "max", "min")]


def _anneal(start, end, pct, strategy: str):
    if strategy == "cos":
        return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


def _follow(t, n, flags, values: dict) -> torch.Tensor:
    """The value at step ``t`` (held at ``total_steps`` beyond), each phase's from its start to its end."""
    step = torch.minimum(t, n["total_steps"]).double()
    out, start_step, chosen = None, torch.zeros((), dtype=torch.float64), None
    phases = _phases(n, flags)
    for i, (end_step, start, end) in enumerate(phases):
        pct = (step - start_step) / (end_step - start_step)
        value = _anneal(values[start], values[end], pct, flags["anneal_strategy"])
        here = step <= end_step if i < len(phases) - 1 else torch.ones((), dtype=torch.bool)
        here = here if chosen is None else here & ~chosen
        out = value if out is None else torch.where(here, value, out)
        chosen = here if chosen is None else chosen | here
        start_step = end_step
    return out


def _lr(base, t, n, flags):
    initial = n["max_lr"] / n["div_factor"]
    return _follow(t, n, flags, {"initial": initial, "max": n["max_lr"], "min": initial / n["final_div_factor"]})


def _momentum(t, n, flags):
    # momentum is max_momentum where the lr is initial or min, base_momentum where it is max
    return _follow(t, n, flags, {"initial": n["max_momentum"], "max": n["base_momentum"], "min": n["max_momentum"]})


def _complete(resolved):
    if resolved["total_steps"] is None:
        resolved = {**resolved, "total_steps": resolved["epochs"] * resolved["steps_per_epoch"]}
    return {**resolved, "epochs": None, "steps_per_epoch": None}  # total_steps says it


def _refuse(resolved):
    if not isinstance(resolved["cycle_momentum"], bool) or not isinstance(resolved["three_phase"], bool):
        raise ValueError("torch.optim.lr_scheduler.OneCycleLR cycle_momentum and three_phase must be True or False.")
    total = resolved["total_steps"] or resolved["epochs"] * resolved["steps_per_epoch"]
    ends = [p for p in (resolved["pct_start"] * total - 1, total - 1)]
    if ends[0] <= 0 or ends[1] <= ends[0] or (resolved["three_phase"] and 2 * ends[0] >= ends[1]):
        raise ValueError(f"torch.optim.lr_scheduler.OneCycleLR with total_steps={total} and pct_start="
                         f"{resolved['pct_start']} has a phase of no steps, which torch divides by; give more "
                         "total_steps or another pct_start.")


ONE_CYCLE = register_schedule(ScheduleFamily(
    torch.optim.lr_scheduler.OneCycleLR, _lr, integers=("total_steps", "epochs", "steps_per_epoch"),
    floats=("max_lr", "pct_start", "base_momentum", "max_momentum", "div_factor", "final_div_factor"),
    flags=("anneal_strategy", "cycle_momentum", "three_phase"), optional=("total_steps", "epochs", "steps_per_epoch"),
    momentum=_momentum, cycles_momentum=lambda flags: bool(flags["cycle_momentum"]), absolute=True,
    complete=_complete, refuse=_refuse))
