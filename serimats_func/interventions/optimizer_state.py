"""Interventions on the optimizer's state: reset it, as ``optimizer.state.clear()`` does in plain PyTorch.

>>> ResetOptimizerState.make_variations(at=(100, 200))[1].windows()
((200, 201),)
>>> ResetOptimizerState(when=(10, 20)).windows()
((10, 20),)
"""

from __future__ import annotations

import numbers
from typing import Any

from .base import FOREVER, Intervention


class ResetOptimizerState(Intervention):
    """Give the learner a new optimizer's state (zero momentum buffer and moments, step count 0) before the
    update of step ``at`` (``at=k``: after k updates, as ``optimizer.state.clear()`` right before the (k+1)-th
    ``optimizer.step()``), or before every update in the windows of ``when``. The hyperparameters stay.
    Adam's bias corrections restart with its step count; SGD's buffer restarts at the next gradient."""

    axes = {"at": None}
    per_learner_axes = frozenset({"at"})  # enters the step as its window
    builtin = True

    def _check(self, axis: str, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0):
            raise ValueError(f"ResetOptimizerState at= takes a step (the number of updates done, an integer >= 0); "
                             f"got {value!r}. For several steps, use when=((start, end), ...).")
        return value if value is None else int(value)

    def is_default(self) -> bool:
        return self.values["at"] is None and self.values["when"] is None

    def first_active_step(self) -> int:
        return self.window_start()  # its hooks act only in its windows

    def windows(self) -> tuple[tuple[int, int], ...]:
        at = self.values["at"]
        own = () if at is None else ((at, at + 1),)
        when = () if self.values["when"] is None else super().windows()
        return tuple(sorted(set(own + when))) or ((0, FOREVER),)

    def numbers(self, setup: Any) -> dict[str, Any]:
        return {}

    def on_optimizer_state(self, state: Any, n: Any, ctx: Any) -> Any:
        return ctx.new_optimizer_state()
