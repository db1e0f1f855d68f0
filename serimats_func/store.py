"""The Zarr (v3) store: one folder of immutable batches of learners, read through xarray.

Layout::

    runs/perturb.zarr/            root group, attrs {"format": "serimats-func/2"}
      batches/<time>-<uuid>/      one group per trained chunk: metrics (learner, step), diverged_at
                                  (learner,), attrs {"learner_ids": [...], "configs": [...],
                                  "metric_keys": {metric: digest}, "device": ..., "torch": ...}
      .pending/                   batches being written

A batch is written in full under ``.pending`` and then renamed into ``batches/`` in one atomic
step, so a crash never leaves a half-written batch where readers look, and the store always
opens. Batches are never changed or deleted: nothing in a store is overwritten. A learner may be in
several batches; a batch serves it when it holds every step and metric asked for (metrics are named by
a digest of what decides their values), the oldest such batch first.

>>> import numpy as np, tempfile
>>> store = Store(tempfile.mkdtemp() + "/demo.zarr")
>>> _ = store.write(["a1"], [{"lr": 0.1}], np.array([0, 5]), {"loss": np.array([[2.3, 0.4]])})
>>> store.find("a1", steps=(0, 5), metric_keys={"loss": None})[1]  # (batch, position)
0
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

FORMAT = "serimats-func/2"
FORMAT_HISTORY = {"serimats-func/1": "learner ids before interventions at any step (version 0.1)"}


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
        if fmt in FORMAT_HISTORY:
            raise StoreError(
                f"{self.path} was made by an older serimats-func (format {fmt!r}: {FORMAT_HISTORY[fmt]}); its learner "
                f"ids are not this version's ({FORMAT!r}), so nothing in it could be reused. Use a new store= path, or "
                "move the old store away; nothing in it is changed."
            )
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

    def _batch_attrs(self) -> dict[str, dict[str, Any]]:
        """Attributes of every complete batch, oldest first (cached until the batches change)."""
        names = self.batches()
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != names:
            attrs = {b: dict(zarr.open_group(self.path / "batches" / b, mode="r").attrs) for b in names}
            self._cache = cache = (names, attrs)
        return cache[1]

    def batch_attrs(self) -> dict[str, dict[str, Any]]:
        """Each complete batch's attributes (learner ids, configs, steps, metric keys...), oldest first."""
        return dict(self._batch_attrs())

    def index(self) -> dict[str, list[tuple[str, int]]]:
        """learner id -> every (batch, position) that holds it, oldest batch first."""
        found: dict[str, list[tuple[str, int]]] = {}
        for batch, attrs in self._batch_attrs().items():
            for position, learner_id in enumerate(attrs["learner_ids"]):
                found.setdefault(learner_id, []).append((batch, position))
        return found

    def configs(self) -> dict[str, dict[str, Any]]:
        """learner id -> its resolved configuration, for every learner in the store."""
        out: dict[str, dict[str, Any]] = {}
        for attrs in self._batch_attrs().values():
            for learner_id, config in zip(attrs["learner_ids"], attrs["configs"], strict=True):
                out.setdefault(learner_id, config)
        return out

    def find(self, learner_id: str, steps: Sequence[int], metric_keys: Mapping[str, str | None]) -> tuple[str, int] | None:
        """The oldest (batch, position) that holds ``learner_id`` at every step of ``steps`` with every metric of
        ``metric_keys`` (name -> digest of what decides it; None accepts any), or None."""
        attrs_by_batch = self._batch_attrs()
        for batch, position in self.index().get(learner_id, []):
            attrs = attrs_by_batch[batch]
            stored = attrs.get("metric_keys", {})
            if not set(steps) <= set(attrs.get("steps", [])):
                continue
            if all(name in stored and (key is None or stored[name] == key) for name, key in metric_keys.items()):
                return batch, position
        return None

    def write(
        self,
        ids: Sequence[str],
        configs: Sequence[Mapping[str, Any]],
        steps: Sequence[int],
        metrics: Mapping[str, np.ndarray],
        per_learner: Mapping[str, np.ndarray] | None = None,
        metric_keys: Mapping[str, str] | None = None,
        attrs: Mapping[str, Any] | None = None,
        dims: Mapping[str, Sequence[str]] | None = None,
        labels: Mapping[str, Sequence] | None = None,
    ) -> str:
        """Add one batch of learners: ``metrics[name]`` is (len(ids), len(steps), *its own dims), whose names
        ``dims[name]`` gives (default ``<name>_dim0``...) and whose labels ``labels[dim]`` (default positions);
        ``per_learner[name]`` is (len(ids),); ``metric_keys`` names what decides each metric (default: its name)."""
        self.create()
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        variables, coords = {}, {"learner": np.arange(len(ids)), "step": np.asarray(steps, dtype=np.int64)}
        for k, v in metrics.items():
            v = np.asarray(v, dtype=np.float64)
            own = tuple((dims or {}).get(k, ())) or tuple(f"{k}_dim{i}" for i in range(v.ndim - 2))
            variables[k] = (("learner", "step") + own, v)
            for dim, size in zip(own, v.shape[2:], strict=True):
                given = (labels or {}).get(dim)
                coords.setdefault(dim, np.arange(size) if given is None else np.array(list(given), dtype=object))
        variables.update({k: (("learner",), np.asarray(v)) for k, v in (per_learner or {}).items()})
        data = xr.Dataset(
            variables,
            coords=coords,
            attrs={"learner_ids": list(ids), "configs": [dict(c) for c in configs], "steps": [int(s) for s in steps],
                   "metric_keys": dict(metric_keys) if metric_keys is not None else {k: k for k in metrics},
                   **(attrs or {})},
        )
        pending = self.path / ".pending" / name
        pending.parent.mkdir(exist_ok=True)
        data.to_zarr(pending, mode="w-", zarr_format=3, consolidated=False)
        os.rename(pending, self.path / "batches" / name)
        return name

    def _open(self, batch: str) -> xr.Dataset:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            return xr.open_zarr(self.path / "batches" / batch, consolidated=False)

    def read_found(self, found: Sequence[tuple[Any, tuple[str, int], Sequence[int]]], metrics: Sequence[str]) -> xr.Dataset:
        """Metrics of learners located by ``find``: ``found`` holds (spec with ``.id``, (batch, position),
        its steps). Dims (learner, step, *the metric's own dims) over the union of the steps and of the own dims'
        labels (NaN where a learner has no such step or label); the learner coordinate holds the ids;
        per-learner variables (diverged_at) too."""
        steps = sorted({int(s) for _, _, st in found for s in st})
        ids = [spec.id for spec, _, _ in found]
        by_batch: dict[str, list[tuple[int, int, Sequence[int]]]] = {}
        for row, (_, (batch, position), st) in enumerate(found):
            by_batch.setdefault(batch, []).append((row, position, st))
        column = {s: i for i, s in enumerate(steps)}
        # per metric: (own dims, {dim: labels}, [(row, columns, values (steps, *own))])
        pieces: dict[str, list] = {m: [] for m in metrics}
        own_dims: dict[str, tuple[str, ...]] = {}
        labels: dict[str, dict] = {}
        diverged = np.full(len(ids), -1, dtype=np.int64)
        for batch, members in by_batch.items():
            ds = self._open(batch)
            stored_steps = {int(s): i for i, s in enumerate(ds["step"].values)}
            positions = [p for _, p, _ in members]
            for m in metrics:
                if m not in ds:
                    continue
                own = own_dims.setdefault(m, ds[m].dims[2:])
                batch_labels = [ds[d].values.tolist() for d in own]
                for d, values in zip(own, batch_labels, strict=True):
                    labels.setdefault(d, {}).update((v, None) for v in values)
                values = ds[m].isel(learner=positions).values  # (members, stored steps, *own dims)
                for k, (row, _, st) in enumerate(members):
                    taken = values[k][[stored_steps[int(s)] for s in st]]
                    pieces[m].append((row, [column[int(s)] for s in st], batch_labels, taken))
            if "diverged_at" in ds:
                diverged[[r for r, _, _ in members]] = ds["diverged_at"].isel(learner=positions).values
            ds.close()
        order = {d: {v: i for i, v in enumerate(values)} for d, values in labels.items()}
        variables, coords = {}, {"learner": np.array(ids, dtype=object), "step": np.array(steps, dtype=np.int64)}
        for m in metrics:
            own = own_dims.get(m, ())
            out = np.full((len(ids), len(steps)) + tuple(len(order[d]) for d in own), np.nan)
            for row, columns, batch_labels, values in pieces[m]:
                where = [[order[d][v] for v in batch_labels[i]] for i, d in enumerate(own)]
                out[np.ix_([row], columns, *where)] = values[None]
            variables[m] = (("learner", "step") + own, out)
            coords.update({d: np.asarray(list(order[d])) for d in own})
        variables["diverged_at"] = (("learner",), diverged)
        return xr.Dataset(variables, coords=coords)
