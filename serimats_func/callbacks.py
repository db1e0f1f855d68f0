"""Callbacks: watch a run's training as it goes (progress, timing, a simulated crash in a test), without
reaching into the library's internals.

``Experiment(..., callbacks=[watch])`` calls, for each chunk of learners that ``run()`` (or a shard's
``train_only``) trains:

- ``watch.on_chunk_start(chunk)`` before the chunk trains;
- ``watch.on_step(chunk, step, state, loss)`` once where the chunk starts (``step == chunk.start``, before
  any update, ``loss`` None), then after each update (``step``: updates done; ``loss``: each learner's loss
  on its batch, a tensor (N,) on the device, in the order of ``chunk.ids``);
- ``watch.on_chunk_end(chunk, result)`` once the chunk is trained (``result``: its
  ``training.ChunkResult``), before its results are written to the store.

A callback may define any of the three (a subclass of ``Callback`` inherits the others, which do nothing).
Callbacks change nothing: ``state`` (the chunk's state pytree, learner axis first; a lone learner trains
as two identical copies, so its axis may be longer than ``chunk.ids``) is read-only, learner ids do not
depend on callbacks, and a run with callbacks gives the same numbers as one without. What a callback costs
is paid at every step: keep ``on_step`` cheap (copying to the host synchronizes with the device).

A callback that raises stops the run as a crash at that point would: the exception reaches the caller
of ``run()``, checkpoints saved so far stay in the store, and running again resumes from them.

>>> class Count(Callback):
...     def __init__(self):
...         self.updates = 0
...     def on_step(self, chunk, step, state, loss):
...         self.updates += loss is not None
>>> count = Count()
>>> Callbacks([count]).on_step(ChunkInfo(0, ("a1",), 0, 10), 1, {}, object())
>>> count.updates
1
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

METHODS = ("on_chunk_start", "on_step", "on_chunk_end")


@dataclass(frozen=True)
class ChunkInfo:
    """A chunk as callbacks see it: its place among the chunks this run trained (``index``, from 0), its
    learners' ids, the step it starts from (0, or a stored state's step) and its last step."""

    index: int
    ids: tuple[str, ...]
    start: int
    total_steps: int


class Callback:
    """Base class of callbacks: override what you need (see the module's documentation)."""

    def on_chunk_start(self, chunk: ChunkInfo) -> None:
        """Before ``chunk`` trains."""

    def on_step(self, chunk: ChunkInfo, step: int, state: Any, loss: Any | None) -> None:
        """Where the chunk starts (``loss`` None), then after each update: ``step`` updates done."""

    def on_chunk_end(self, chunk: ChunkInfo, result: Any) -> None:
        """Once ``chunk`` is trained, before its results are written."""


class Callbacks(Callback):
    """Several callbacks as one, called in order; each method only on those that define it."""

    def __init__(self, callbacks: Sequence[object] = ()):
        self.callbacks = tuple(check_callbacks(callbacks))
        self._chunk_start = [c.on_chunk_start for c in self.callbacks if callable(getattr(c, "on_chunk_start", None))]
        self._step = [c.on_step for c in self.callbacks if callable(getattr(c, "on_step", None))]
        self._chunk_end = [c.on_chunk_end for c in self.callbacks if callable(getattr(c, "on_chunk_end", None))]

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    @property
    def watch_steps(self) -> bool:
        """Whether any callback watches steps (else the run loop need not call ``on_step``)."""
        return bool(self._step)

    def on_chunk_start(self, chunk: ChunkInfo) -> None:
        for fn in self._chunk_start:
            fn(chunk)

    def on_step(self, chunk: ChunkInfo, step: int, state: Any, loss: Any | None) -> None:
        for fn in self._step:
            fn(chunk, step, state, loss)

    def on_chunk_end(self, chunk: ChunkInfo, result: Any) -> None:
        for fn in self._chunk_end:
            fn(chunk, result)


def check_callbacks(callbacks: object) -> list[object]:
    """``callbacks`` as a list, or a ``ValueError`` saying what is wrong with it."""
    if isinstance(callbacks, Callbacks):
        return list(callbacks.callbacks)
    if callbacks is None:
        return []
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, (list, tuple)):
        callbacks = [callbacks]
    out = list(callbacks)
    for c in out:
        if isinstance(c, type):
            raise ValueError(f"callbacks= takes instances; got the class {c.__name__}: use callbacks=[{c.__name__}()].")
        if not any(callable(getattr(c, m, None)) for m in METHODS):
            raise ValueError(f"A callback defines at least one of {', '.join(METHODS)} (see serimats_func.callbacks); "
                             f"got {c!r:.80}.")
    return out
