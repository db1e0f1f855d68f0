"""Callbacks the tests watch runs with (``Experiment(..., callbacks=[...])``): counting updates, and crashing
a run at a chosen point as a killed machine or a Ctrl-C would."""

from __future__ import annotations

from serimats_func.callbacks import Callback


class CountSteps(Callback):
    """Counts the updates of the runs it watches (``calls``: the step reached by each). With ``crash_before=n``,
    raises ``error`` (once) in place of the n-th update: after n - 1 updates, before any later one."""

    def __init__(self, crash_before: int | None = None, error: BaseException | None = None):
        self.calls: list[int] = []
        self.crash_before, self.error, self.crashed = crash_before, error, False

    def on_step(self, chunk, step, state, loss) -> None:
        if loss is not None:
            self.calls.append(step)
        if self.crash_before is not None and not self.crashed and len(self.calls) == self.crash_before - 1:
            self.crashed = True
            raise self.error if self.error is not None else RuntimeError("the machine went down")


class KilledAfterChunks(Callback):
    """Lets ``n`` chunks train (``sizes``: their learner counts), then raises ``KeyboardInterrupt`` as the next
    one starts, as a kill between chunks would."""

    def __init__(self, n: int):
        self.n, self.sizes = n, []

    def on_chunk_start(self, chunk) -> None:
        if len(self.sizes) == self.n:
            raise KeyboardInterrupt("killed")
        self.sizes.append(len(chunk.ids))
