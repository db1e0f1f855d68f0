"""The purity check of a training step: run once on meta tensors (shapes, no values), so that a hook, model or
loss that reads a tensor's value in Python is refused before anything trains, with a message naming the
interventions in the step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import pytrees
from .step import Hooks

HOST_SYNC_SIGNS = ("item()", "meta tensor", "data-dependent", "to numpy", "Cannot copy out of meta")


def check_pure(step: Callable, state: dict, x: torch.Tensor, y: torch.Tensor, hooks: Hooks) -> None:
    """Run ``step`` once on meta tensors (shapes without data): a Python branch on a tensor's value, an
    ``.item()``, ``float(tensor)``, ``.cpu()`` or ``.numpy()`` inside it fails there, and is refused with a
    message naming the interventions in the step. Operations that meta tensors lack are not errors here."""
    def meta(t: Any) -> Any:
        return t.to("meta") if isinstance(t, torch.Tensor) else t

    try:
        step(pytrees.tree_map(meta, state), meta(x), meta(y), torch.zeros((), dtype=torch.int64, device="meta"))
    except Exception as error:
        refusal = host_sync_error(error, hooks)
        if refusal is not None:
            raise refusal from error


def host_sync_error(error: Exception, hooks: Hooks) -> ValueError | None:
    """The refusal of a step that failed because it reads a tensor's value in Python (None for other errors)."""
    if not any(sign in str(error) for sign in HOST_SYNC_SIGNS):
        return None
    names = sorted({h.name for h in hooks.in_step})
    where = f" (interventions in this step: {', '.join(names)})" if names else ""
    return ValueError(
        f"The training step reads a tensor's value in Python or copies it to the host{where}: "
        f"{type(error).__name__}: {error}. One step serves every learner of a group at once, so hooks, models "
        "and losses must not branch on a tensor's value (`if step > 100:`), call .item(), float(tensor), .cpu() "
        "or .numpy(): use torch.where on tensors instead (e.g. torch.where(ctx.step >= 100, new, old))."
    )
