"""The Zarr (v3) store: one folder of immutable batches of learners, read through xarray.

Layout::

    runs/perturb.zarr/            root group, attrs {"format": "serimats-func/1"}
      batches/<time>-<uuid>/      one group per trained chunk: metrics (learner, step),
                                  attrs {"learner_ids": [...], "configs": [...]}
      .pending/                   batches being written

A batch is written in full under ``.pending`` and then renamed into ``batches/`` in one atomic
step, so a crash never leaves a half-written batch where readers look, and the store always
opens. Batches are never changed or deleted: nothing in a store is overwritten. If a learner is
in two batches (two shards trained it), the older batch is read.

>>> import numpy as np, tempfile
>>> store = Store(tempfile.mkdtemp() + "/demo.zarr")
>>> _ = store.write(["a1"], [{"lr": 0.1}], np.array([0, 5]), {"loss": np.array([[2.3, 0.4]])})
>>> store.read(["a1"]).loss.values.tolist()
[[2.3, 0.4]]
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

FORMAT = "serimats-func/1"


class StoreError(ValueError):
    """A path that is not a serimats-func store, or a store that cannot be used."""


class Store:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def check(self) -> None:
        """Refuse a path that holds something other than a serimats-func store, or where one
        cannot be created (writes nothing)."""
        if not self.path.exists():
            ancestor = self.path.parent
            while not ancestor.exists():
                ancestor = ancestor.parent
            if not ancestor.is_dir():
                raise StoreError(f"Cannot create store {self.path}: {ancestor} is not a folder.")
            if not os.access(ancestor, os.W_OK | os.X_OK):
                raise StoreError(f"Cannot create store {self.path}: {ancestor} is not writable.")
            return
        if not (self.path / "zarr.json").is_file():
            raise StoreError(f"{self.path} exists and is not a serimats-func store; choose another store= path.")
        fmt = zarr.open_group(self.path, mode="r").attrs.get("format")
        if fmt != FORMAT:
            raise StoreError(f"{self.path} is a Zarr group but not a serimats-func store (format {fmt!r}); "
                             "choose another store= path.")

    def create(self) -> None:
        """Make the store if it does not exist: built aside, then renamed into place in one step,
        so a crash never leaves a half-made store."""
        self.check()
        if self.path.exists():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        aside = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
        zarr.create_group(aside, zarr_format=3, attributes={"format": FORMAT})
        zarr.create_group(aside / "batches", zarr_format=3)
        try:
            os.rename(aside, self.path)
        except OSError:  # another process made it first
            if not self.path.exists():
                raise
            shutil.rmtree(aside)
        self.check()

    def batches(self) -> list[str]:
        """Names of the complete batches, oldest first."""
        folder = self.path / "batches"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file())

    def _members(self) -> dict[str, tuple[str, int, dict[str, Any]]]:
        """learner id -> (batch, position in it, resolved configuration); the oldest batch wins."""
        found: dict[str, tuple[str, int, dict[str, Any]]] = {}
        for batch in self.batches():
            attrs = zarr.open_group(self.path / "batches" / batch, mode="r").attrs
            for position, (learner_id, config) in enumerate(zip(attrs["learner_ids"], attrs["configs"], strict=True)):
                found.setdefault(learner_id, (batch, position, config))
        return found

    def index(self) -> dict[str, tuple[str, int]]:
        """learner id -> (batch, position in it), for every learner in the store."""
        return {i: (batch, position) for i, (batch, position, _) in self._members().items()}

    def configs(self) -> dict[str, dict[str, Any]]:
        """learner id -> its resolved configuration, for every learner in the store."""
        return {i: config for i, (_, _, config) in self._members().items()}

    def write(
        self,
        ids: Sequence[str],
        configs: Sequence[Mapping[str, Any]],
        steps: np.ndarray,
        metrics: Mapping[str, np.ndarray],
    ) -> str:
        """Add one batch of learners: ``metrics[name]`` is (len(ids), len(steps))."""
        self.create()
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        data = xr.Dataset(
            {k: (("learner", "step"), np.asarray(v, dtype=np.float64)) for k, v in metrics.items()},
            coords={"learner": np.arange(len(ids)), "step": np.asarray(steps, dtype=np.int64)},
            attrs={"learner_ids": list(ids), "configs": [dict(c) for c in configs]},
        )
        pending = self.path / ".pending" / name
        pending.parent.mkdir(exist_ok=True)
        data.to_zarr(pending, mode="w-", zarr_format=3, consolidated=False)
        os.rename(pending, self.path / "batches" / name)
        return name

    def read(self, ids: Sequence[str]) -> xr.Dataset:
        """Metrics of the learners ``ids`` (all must be in the store), dims (learner, step);
        the learner coordinate holds the ids."""
        where = self.index()
        missing = [i for i in ids if i not in where]
        if missing:
            raise KeyError(f"{len(missing)} learners are not in {self.path}, e.g. {missing[0]}.")
        parts = []
        by_batch: dict[str, list[tuple[str, int]]] = {}
        for learner_id in dict.fromkeys(ids):
            batch, position = where[learner_id]
            by_batch.setdefault(batch, []).append((learner_id, position))
        for batch, members in by_batch.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=RuntimeWarning)
                ds = xr.open_zarr(self.path / "batches" / batch, consolidated=False)
            part = ds.isel(learner=[p for _, p in members]).load()
            ds.close()
            part = part.assign_coords(learner=[i for i, _ in members])
            part.attrs = {}
            parts.append(part)
        merged = parts[0] if len(parts) == 1 else xr.concat(parts, dim="learner", join="outer")
        return merged.sel(learner=list(ids))
