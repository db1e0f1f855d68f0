"""Dropout masks from another seed, from a chosen update on: the second source of SGD noise beside the data order.

Every ``nn.Dropout`` of a template is a ``KeyedDropout`` whose masks are a pure function of its ``key`` buffer
and its call count. ``DropoutMasks(seed=s, at=k)`` folds the learner's ``DropoutMasks`` key (from the experiment
seed and ``s``) into every such layer's key before update k (``ctx.step == k``): the first k updates draw the
default masks, bitwise, and every later one draws masks of its own. With ``DataOrder(seed=..., at=k)`` beside it,
a spawned copy differs from its parent in both sources of SGD noise from step k on.

>>> vs = DropoutMasks.make_variations(seed=(1, 2), at=500)
>>> vs[1].values, vs[1].first_active_step()
({'seed': 2, 'at': 500}, 500)
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from ..core.dropout import KeyedDropout
from ..core.keys import fold_in
from .base import Intervention
from .weights import seed_value


def dropout_keys(template: torch.nn.Module) -> list[str]:
    """The names of the key buffers of a prepared template's dropout layers (``"2.key"``)."""
    return [f"{name}.key" if name else "key" for name, m in template.named_modules() if isinstance(m, KeyedDropout)]


def folded(buffers: dict[str, torch.Tensor], layers: Any, key: torch.Tensor, now: torch.Tensor) -> dict:
    """``buffers`` with each dropout key of ``layers`` replaced by ``fold_in(layer key, key)`` where ``now``."""
    return {k: torch.where(now, fold_in(b, key), b) if k in layers else b for k, b in buffers.items()}


class DropoutMasks(Intervention):
    """Draw the dropout masks from ``seed`` from update ``at`` on (``at=k``: after k updates; default 0, from the
    start). Exactly: each dropout layer's key becomes ``fold_in(its key, the learner's DropoutMasks key)`` right
    before update k (``at=0``: in the initial state), and its call count goes on as it was, so a layer's mask at
    call c is ``uniform(fold_in(fold_in(key, K), c))`` for c >= the calls of the first k updates. Before update
    k the learner is bitwise the one without it (its prefix: it forks there). ``seed=0`` (the default) changes
    nothing. The model needs a dropout layer (``nn.Dropout``, ``Dropout1d/2d/3d``)."""

    axes = {"seed": 0, "at": 0}
    prefix = "dropout"
    windowed = False  # it acts once, at ``at``
    order = 10
    builtin = True

    def _check(self, axis: str, value: Any) -> Any:
        if axis == "at" and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0):
            raise ValueError(f"DropoutMasks at= takes a step (the number of updates done before the new masks, an "
                             f"integer >= 0); got {value!r}.")
        return seed_value(axis, value, "DropoutMasks")

    def is_default(self) -> bool:
        return self.values["seed"] == 0

    def active_in_step(self) -> bool:
        return not self.is_default() and self.values["at"] > 0

    def first_active_step(self) -> int:
        return self.values["at"]

    def beyond_run(self, total_steps: int) -> str | None:
        at = self.values["at"]
        return None if self.is_default() or at < total_steps else f"at={at} acts before update {at + 1}"

    def check(self, setup: Any) -> None:
        if not self.is_default() and not dropout_keys(setup.template):
            raise ValueError("DropoutMasks changes dropout masks, but the model has no dropout layer (nn.Dropout, "
                             "Dropout1d/2d/3d); add one (e.g. MLP(widths=..., dropout=0.2)) or leave DropoutMasks out.")

    def numbers(self, setup: Any) -> dict[str, Any]:
        return {"at": self.values["at"], "layers": dict.fromkeys(dropout_keys(setup.template), True)}

    def on_init(self, state: Any, n: Any, ctx: Any) -> Any:
        return state._replace(buffers=folded(state.buffers, n.layers, ctx.key, n.at == 0))

    def on_buffers(self, buffers: dict, n: Any, ctx: Any) -> dict:
        return folded(buffers, n.layers, ctx.key, (ctx.step == n.at) & (n.at > 0))
