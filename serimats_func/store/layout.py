"""Where things are in a store: its folder names and the paths built from them, in one place (the layout
itself is described in ``serimats_func.store.zarr_store``). Every module that finds its way in a store asks this one.

>>> layout = StoreLayout("runs/perturb.zarr")
>>> layout.checkpoint("a1b2-8-ff00").as_posix(), layout.claim("a1b2").as_posix()
('runs/perturb.zarr/checkpoints/a1b2-8-ff00', 'runs/perturb.zarr/.claims/a1b2.lock')
>>> StoreLayout.state_group(8)
'states/8'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .locks import LOCK_SUFFIX

BATCHES = "batches"  # one group per trained chunk, never changed once in place
CHECKPOINTS = "checkpoints"  # chunks in training
PENDING = ".pending"  # folders being written
CLAIMS = ".claims"  # one lock file per learner in training
EXPERIMENTS = "experiments"  # one small record per experiment name and grid: which learners it names
STATES = "states"  # inside a batch or checkpoint: full states, one group per step
DAMAGED = "damaged"  # batches and checkpoints found damaged, set aside (never deleted)
GROUP_MARK = "zarr.json"  # what makes a folder a (complete) Zarr group
FOLDERS = (BATCHES, CHECKPOINTS, PENDING, CLAIMS, EXPERIMENTS)  # the store's own folders, made with it
KINDS = {"batch": BATCHES, "checkpoint": CHECKPOINTS, "experiment": EXPERIMENTS}  # a source's kind -> its folder


@dataclass(frozen=True)
class StoreLayout:
    """The paths of the store at ``root``."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def mark(self) -> Path:
        """The root group's ``zarr.json``: present once the store exists."""
        return self.root / GROUP_MARK

    @property
    def batches(self) -> Path:
        return self.root / BATCHES

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def pending(self) -> Path:
        return self.root / PENDING

    @property
    def claims(self) -> Path:
        return self.root / CLAIMS

    @property
    def damaged(self) -> Path:
        return self.root / DAMAGED

    @property
    def experiments(self) -> Path:
        return self.root / EXPERIMENTS

    def folder(self, name: str) -> Path:
        """One of the store's ``FOLDERS``."""
        return self.root / name

    def of_kind(self, kind: str) -> Path:
        """The folder of sources of ``kind`` ("batch", "checkpoint" or "experiment")."""
        return self.root / KINDS[kind]

    def batch(self, name: str) -> Path:
        return self.batches / name

    def checkpoint(self, name: str) -> Path:
        return self.checkpoints / name

    def claim(self, learner_id: str) -> Path:
        """The lock file held by the process that trains ``learner_id``."""
        return self.claims / f"{learner_id}{LOCK_SUFFIX}"

    @staticmethod
    def state_group(step: int) -> str:
        """The group, inside a batch or checkpoint, of the full states at ``step``."""
        return f"{STATES}/{int(step)}"

    @staticmethod
    def is_group(folder: Path) -> bool:
        """Whether ``folder`` is a complete Zarr group (written aside and renamed into place)."""
        return (folder / GROUP_MARK).is_file()

    def names(self, kind: str) -> list[str]:
        """The names of the complete sources of ``kind`` ("batch", "checkpoint", "experiment"), sorted (oldest first)."""
        return [p.name for p in self.folders(kind) if self.is_group(p)]

    def folders(self, kind: str) -> list[Path]:
        """Every folder in the folder of ``kind``, sorted: sources, and damaged ones that lost their zarr.json."""
        folder = self.of_kind(kind)
        if not folder.is_dir():
            return []
        return sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.name)
