"""Checkpoints of a chunk in training: its whole state and the metrics so far, saved every so
often, so that a crash loses at most the steps since the last one.

A checkpoint is named by the ids of the chunk's learners, lives in the store's ``checkpoints/``
folder, is written aside and renamed into place (never half-written), and is deleted once the
chunk's results are in the store. Resuming gives bitwise the same numbers as not crashing: the
state is saved exactly, and batches and dropout masks come from keys and step counts.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from . import pytrees


class Checkpoints:
    def __init__(self, folder: str | os.PathLike, learner_ids: Sequence[str], every_steps: int | None = None,
                 every_seconds: float = 600.0):
        name = hashlib.blake2b("\n".join(learner_ids).encode(), digest_size=8).hexdigest()
        self.path = Path(folder) / f"{name}.pt"
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self._last = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether to save after ``step`` updates: every ``every_steps`` if set, else on time."""
        if self.every_steps is not None:
            return step % self.every_steps == 0
        return time.monotonic() - self._last >= self.every_seconds

    def save(self, step: int, state: dict, records: dict[str, list[torch.Tensor]]) -> None:
        payload = {"step": step, "state": pytrees.to(state, "cpu"),
                   "records": {k: [v.cpu() for v in vs] for k, vs in records.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        aside = self.path.with_suffix(".pt.partial")
        torch.save(payload, aside)
        os.replace(aside, self.path)
        self._last = time.monotonic()

    def load(self, device: torch.device) -> tuple[int, dict, dict[str, list[torch.Tensor]]] | None:
        """The last saved (step, state, records), on ``device``, or None."""
        if not self.path.exists():
            return None
        payload = torch.load(self.path, weights_only=True)
        records = {k: [v.to(device) for v in vs] for k, vs in payload["records"].items()}
        return payload["step"], pytrees.to(payload["state"], device), records

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
