"""The Zarr (v3) store: immutable batches of observations of learners, read through xarray.

A learner id names a trajectory (not its length, nor what is recorded along it). The store holds
observations of trajectories: metric values at steps, and full states at steps. Layout::

    runs/perturb.zarr/                 root group, attrs {"format": "serimats-func/2"}
      batches/<time>-<hex>/            one group per trained chunk, never changed once in place:
        train_loss, test_acc, ...      (learner, step) float64, NaN from a learner's divergence on
        diverged_at                    (learner,) int64: step whose loss was first non-finite, -1 if none
        learner, step                  coordinates: position in the batch, updates done
        states/<step>/                 full states of every learner at that step, learner axis first:
          params/<name>, buffers/<name>, opt/<...>, hparams/<name>, diverged_at, interventions/<class>/<...>
                                       each array (learner, ...) with attr "torch_dtype"
        attrs: learner_ids, configs (each learner's resolved configuration, with its "coords"), steps,
               metric_keys ({metric: digest of what decides its values}), state_steps, device,
               device_name, torch, python, manifest ({file: bytes}), digest (see ``integrity``)
      checkpoints/<set>-<step>-<hex>/  a chunk in training: the same layout, metrics up to "step", its state
                                       at "step" and the states kept before; removed once batches hold all it holds
      experiments/<time>-<hex>/        an experiment's record: attrs {"experiment": its name, "learner_ids",
                                       "cells", "dims", "scalars", "control", "control_learner"}: which learners
                                       the experiment of that name names and where they lie in its grid (the
                                       newest record of a name is its grid)
      damaged/<folder>-<name>/         batches and checkpoints found damaged, set aside (never deleted)
      .pending/                        folders being written (each marked by a held lock file)
      .claims/<learner id>.lock        held (fcntl.flock) by the process training that learner

Every batch is a plain Zarr group that ``xarray.open_zarr(path_to_batch)`` reads without this library
(``group="states/<step>/params"`` for weights); attributes are JSON and nothing is pickled. Batches,
checkpoints and the store itself are written aside and renamed into place in one step, so a crash never
leaves a half-written group where readers look. A learner may be in several batches (longer training
adds a batch with its new steps); its value at a step is the oldest batch's (equal by construction).
Every chunk carries a CRC-32C, every batch a manifest and a digest: a damaged batch is reported, set aside into
``damaged/`` and its learners count as missing (``integrity``; ``Store.verify`` checks a whole store).

>>> import numpy as np, tempfile
>>> store = Store(tempfile.mkdtemp() + "/demo.zarr")
>>> _ = store.write(["a1"], [{"coords": {"lr": 0.1}}], [0, 5], {"loss": np.array([[2.3, 0.4]])})
>>> float(store.read([("a1", (5,), {"loss": "loss"})])["loss"].sel(step=5)[0])
0.4
>>> open_store(store.path).lr.values.tolist()
[0.1]
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from . import integrity, locks
from .layout import BATCHES, CHECKPOINTS, CLAIMS, EXPERIMENTS, FOLDERS, PENDING, STATES, StoreLayout

FORMAT = "serimats-func/2"
FORMAT_HISTORY = {"serimats-func/1": "learner ids before interventions at any step (version 0.1)"}
FLAT_CHUNK_KEYS = {"name": "v2", "separator": "."}  # chunk files beside zarr.json: fewer folders
STATE_CHUNK_BYTES = 4 * 2**20  # learners per stored chunk of a state array: about this many bytes

# Names ``open_store`` gives its own dimensions, variables and coordinates along ``learner`` (beside each learner's
# grid coordinates and its optimizer's hyperparameters): a metric may not take one of them.
STORE_VARIABLES = ("learner", "step", "diverged_at", "has_state")
CONFIG_COORDS = ("optimizer", "experiment_seed", "model", "dataset", "batch_size", "control", "config")
ENVIRONMENT = ("device", "device_name", "torch", "python")  # where a batch was trained

Request = tuple[str, Sequence[int], Mapping[str, str | None]]  # (learner id, steps, {metric: digest or None})
FlatState = dict[str, tuple[np.ndarray, str]]  # path -> (array, torch dtype name), one learner or (learner, ...)


class StoreError(ValueError):
    """A path that is not a serimats-func store, or a store that cannot be used."""


class DamagedSourceError(StoreError):
    """A batch or checkpoint found damaged while it was read: it is set aside (``damaged/``) and its learners are
    missing from the store; read again (or plan again) without it."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"The store's {path} is damaged: {problem}.")
        self.path, self.problem = path, problem


class DamagedStoreWarning(UserWarning):
    """A batch or checkpoint of a store was found damaged and set aside; its learners are trained again."""


class StoreWriteError(OSError):
    """A write to the store failed (a full disk, a lost permission...): the message names the path and
    the cause; everything written before is still in the store."""

    def __init__(self, message: str, error: OSError, path: str | os.PathLike):
        super().__init__(error.errno, message, str(path))
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Source:
    """A batch or checkpoint in the store, with its attributes."""

    kind: str  # "batch" or "checkpoint"
    name: str
    path: Path
    attrs: dict[str, Any]

    @property
    def ids(self) -> list[str]:
        return self.attrs["learner_ids"]

    @property
    def steps(self) -> list[int]:
        return self.attrs.get("steps", [])

    @property
    def metric_keys(self) -> dict[str, str | list[str]]:
        """metric -> the digest of what decides it: one for all learners, or one per learner (a list)."""
        return self.attrs.get("metric_keys", {})

    def key(self, metric: str, position: int) -> str | None:
        """The digest of ``metric`` for the learner at ``position`` (None: the source lacks the metric)."""
        k = self.metric_keys.get(metric)
        return k[position] if isinstance(k, list) else k

    def keys_at(self, position: int) -> dict[str, str]:
        return {m: self.key(m, position) for m in self.metric_keys}

    @property
    def dim_labels(self) -> dict[str, list]:
        """Labels of the metrics' own dimensions (``layer``: parameter names...)."""
        return self.attrs.get("dim_labels", {})

    @property
    def state_steps(self) -> list[int]:
        return self.attrs.get("state_steps", [])


@dataclass
class Verification:
    """What ``Store.verify`` found: folders verified, written without checksums (by an older version: read, nothing
    to verify against), damaged (with what is wrong), and already set aside in ``damaged/``."""

    verified: list[Path] = field(default_factory=list)
    unsealed: list[Path] = field(default_factory=list)
    damaged: list[tuple[Path, str]] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)


class Store:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def layout(self) -> StoreLayout:
        """Where things are in this store."""
        return StoreLayout(self.path)

    # -- making and checking -----------------------------------------------------------------------------

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
        if not self.layout.mark.is_file():
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
        """Make the store if it does not exist: built aside, then renamed into place in one step, so a crash
        never leaves a half-made store (a killed process's aside folder is removed by the next call)."""
        self.check()
        if self.path.exists():
            return
        with self.writing("the new store", self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._clean_asides()
            aside = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
            try:
                with locks.aside(self.path, aside):
                    zarr.create_group(aside, zarr_format=3, attributes={"format": FORMAT})
                    for name in FOLDERS:
                        zarr.create_group(StoreLayout(aside).folder(name), zarr_format=3)
            except OSError:
                if not self.layout.mark.is_file():  # else another process made it first
                    raise
        self.check()

    def _clean_asides(self) -> list[Path]:
        """Remove stores half-made beside this one by killed processes (``.NAME.zarr.<hex>``)."""
        siblings = list(self.path.parent.glob(f".{self.path.name}.*"))
        removed = locks.remove_left_behind(p for p in siblings if p.is_dir())
        locks.remove_free_lock_files(p for p in siblings if p.name.endswith(locks.LOCK_SUFFIX)
                                     and not p.with_name(p.name.removesuffix(locks.LOCK_SUFFIX)).exists())
        return removed

    def _folder(self, name: str) -> Path:
        """A folder of the store (made, as a Zarr group, if an older version did not make it)."""
        folder = self.layout.folder(name)
        if not self.layout.is_group(folder):
            with self.writing(f"the folder {name}", folder):
                zarr.open_group(folder, mode="a", zarr_format=3)
        return folder

    def writing(self, what: str, path: Path):
        return _Writing(self, what, path)

    # -- what the store holds ----------------------------------------------------------------------------

    def _names(self, kind: str) -> list[str]:
        return self.layout.names(kind)

    def batches(self) -> list[str]:
        """Names of the complete batches, oldest first."""
        return self._names("batch")

    def sources(self, checkpoints: bool = True) -> list[Source]:
        """Every batch (oldest first), then every checkpoint (oldest first) (cached until they change). Each is
        verified the first time this ``Store`` sees it (its manifest, digest and metric arrays' checksums, see
        ``integrity``): a damaged one is set aside into ``damaged/`` with a warning, and its learners are missing."""
        folders = (tuple(self.layout.folders("batch")), tuple(self.layout.folders("checkpoint")))
        cache = getattr(self, "_cache", None)
        if cache is None or cache[0] != folders:
            found = []
            for kind, paths in zip(("batch", "checkpoint"), folders, strict=True):
                for path in paths:
                    source = self._verified_source(kind, path)
                    if source is not None:
                        found.append(source)
            folders = (tuple(self.layout.folders("batch")), tuple(self.layout.folders("checkpoint")))
            self._cache = cache = (folders, found, _holders(found))
        return [s for s in cache[1] if checkpoints or s.kind == "batch"]

    def _verified_source(self, kind: str, path: Path) -> Source | None:
        """The source in ``path``, verified once per ``Store`` (None: gone meanwhile, or found damaged and set aside)."""
        verified = self.__dict__.setdefault("_verified", {})
        if str(path) in verified:
            return verified[str(path)]
        if str(path) in self.__dict__.get("_damaged", {}):
            return None
        try:
            if not self.layout.is_group(path):
                raise integrity.Damaged(path, f"its {integrity.METADATA} is missing")
            attrs = integrity.read_attributes(path)
            metrics = lambda relative: not relative.startswith(STATES + "/")  # noqa: E731 (states: checked when read)
            problem = integrity.problem(path, attrs) or (
                integrity.bad_checksum(path, attrs, metrics) if integrity.sealed(attrs) else
                integrity.unreadable(path, keep=metrics))
            if problem is not None:
                raise integrity.Damaged(path, problem)
        except FileNotFoundError:  # a checkpoint removed meanwhile
            return None
        except integrity.Damaged as damage:
            if path.exists():  # else removed meanwhile (a checkpoint another process pruned)
                self._set_aside(path, damage.problem)
            return None
        source = verified[str(path)] = Source(kind, path.name, path, attrs)
        return source

    def _set_aside(self, path: Path, problem: str) -> None:
        """Move a damaged batch or checkpoint into ``damaged/`` (never deleted), and warn naming it and what is
        wrong; if it cannot be moved, this ``Store`` ignores it."""
        damaged = self.__dict__.setdefault("_damaged", {})
        if str(path) in damaged:
            return
        damaged[str(path)] = problem
        self.__dict__.get("_verified", {}).pop(str(path), None)
        self._cache = None
        target = self.layout.damaged / f"{path.parent.name}-{path.name}"
        try:
            self.layout.damaged.mkdir(exist_ok=True)
            if target.exists():
                target = target.with_name(f"{target.name}-{uuid.uuid4().hex[:8]}")
            os.rename(path, target)
            where = f"it is moved to {target} (nothing is deleted)"
        except FileNotFoundError:
            return  # another process set it aside first
        except OSError as error:
            where = f"it could not be moved aside ({error.strerror or error}), so it is ignored"
        warnings.warn(f"Damaged {'checkpoint' if path.parent.name == CHECKPOINTS else 'batch'} {path}: {problem}. "
                      f"{where[0].upper()}{where[1:]}; its learners count as missing and are trained again. "
                      f"`serimats-func check {self.path}` verifies the whole store.", DamagedStoreWarning, stacklevel=3)

    def verify(self) -> Verification:
        """Verify every batch and checkpoint in full: manifest, digest, and every chunk of every array decoded (its
        CRC-32C checked). Reads only; changes nothing (a run or ``open_store`` sets damaged ones aside)."""
        report = Verification()
        for kind in ("batch", "checkpoint"):
            for path in self.layout.folders(kind):
                try:
                    if not self.layout.is_group(path):
                        raise integrity.Damaged(path, f"its {integrity.METADATA} is missing")
                    attrs = integrity.read_attributes(path)
                    problem = integrity.problem(path, attrs) or integrity.unreadable(path)
                except FileNotFoundError:
                    continue
                except integrity.Damaged as damage:
                    attrs, problem = {}, damage.problem
                if problem is not None and path.exists():  # else a checkpoint removed meanwhile
                    report.damaged.append((path, problem))
                elif problem is not None:
                    continue
                elif integrity.sealed(attrs):
                    report.verified.append(path)
                else:
                    report.unsealed.append(path)
        if self.layout.damaged.is_dir():
            report.set_aside.extend(sorted(self.layout.damaged.iterdir()))
        return report

    def damaged(self, source: Source, error: BaseException | str) -> DamagedSourceError:
        """Set ``source`` aside after ``error`` while reading it; the error to raise (callers read again without it)."""
        problem = error if isinstance(error, str) else integrity.unreadable(source.path) or (
            f"it cannot be read ({type(error).__name__}: {error})")
        self._set_aside(source.path, problem)
        return DamagedSourceError(source.path, problem)

    def retrying(self, read):
        """``read()``, again without each source it finds damaged (set aside meanwhile)."""
        for _ in range(len(self.sources()) + 1):
            try:
                return read()
            except DamagedSourceError:
                continue
        return read()

    def holders(self, learner_id: str, checkpoints: bool = True) -> list[tuple[Source, int]]:
        """Every (source, position) that holds ``learner_id``: batches oldest first, then checkpoints."""
        self.sources()
        return [(s, p) for s, p in self._cache[2].get(learner_id, []) if checkpoints or s.kind == "batch"]

    def index(self) -> dict[str, list[tuple[str, int]]]:
        """learner id -> every (batch, position) that holds it, oldest batch first."""
        found: dict[str, list[tuple[str, int]]] = {}
        for source in self.sources(checkpoints=False):
            for position, learner_id in enumerate(source.ids):
                found.setdefault(learner_id, []).append((source.name, position))
        return found

    def configs(self) -> dict[str, dict[str, Any]]:
        """learner id -> its resolved configuration, for every learner in the store's batches."""
        out: dict[str, dict[str, Any]] = {}
        for source in self.sources(checkpoints=False):
            for learner_id, config in zip(source.ids, source.attrs["configs"], strict=True):
                out.setdefault(learner_id, config)
        return out

    # -- writing -----------------------------------------------------------------------------------------

    def write(
        self,
        ids: Sequence[str],
        configs: Sequence[Mapping[str, Any]],
        steps: Sequence[int],
        metrics: Mapping[str, np.ndarray],
        per_learner: Mapping[str, np.ndarray] | None = None,
        metric_keys: Mapping[str, str] | None = None,
        attrs: Mapping[str, Any] | None = None,
        states: Mapping[int, FlatState] | None = None,
        dims: Mapping[str, Sequence[str]] | None = None,
        labels: Mapping[str, Sequence] | None = None,
    ) -> str:
        """Add one batch of learners: ``metrics[name]`` is (len(ids), len(steps)), ``per_learner[name]``
        (len(ids),), ``states[step]`` the learners' full states at that step ({path: ((len(ids), ...) array,
        torch dtype)}); ``metric_keys`` names what decides each metric (default: its name): one dict for all
        learners or one per learner. A metric with dimensions of its own is (len(ids), len(steps), *dims), named
        by ``dims[metric]`` (default ``<metric>_dim0``...) and labelled by ``labels[dim]`` (default positions)."""
        stamp = time.time_ns()
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.localtime(stamp // 10**9))}.{stamp % 10**9:09d}-{uuid.uuid4().hex[:8]}"
        return self._write_group(BATCHES, name, ids, configs, steps, metrics, per_learner, metric_keys,
                                 {"kind": "batch", **(attrs or {})}, states or {}, dims, labels)

    def write_checkpoint(self, step: int, ids: Sequence[str], configs: Sequence[Mapping[str, Any]], steps: Sequence[int],
                         metrics: Mapping[str, np.ndarray], per_learner: Mapping[str, np.ndarray],
                         metric_keys: Mapping[str, str] | Sequence[Mapping[str, str]], attrs: Mapping[str, Any],
                         state: FlatState, dims: Mapping[str, Sequence[str]] | None = None,
                         labels: Mapping[str, Sequence] | None = None,
                         kept: Mapping[int, FlatState] | None = None) -> str:
        """Add a checkpoint of a chunk in training: its metrics so far, its state at ``step`` and the states
        ``kept`` at earlier steps. Named by the learner set and the step; older checkpoints of the same learners
        are removed once it is in place."""
        name = f"{learner_set(ids)}-{step:010d}-{uuid.uuid4().hex[:8]}"
        self._write_group(CHECKPOINTS, name, ids, configs, steps, metrics, per_learner, metric_keys,
                          {"kind": "checkpoint", "step": int(step), **attrs}, {**(kept or {}), step: state}, dims, labels)
        sources = self.sources()
        batches = [s for s in sources if s.kind == "batch"] + [s for s in sources if s.name == name]
        for old in sources:
            if old.kind == "checkpoint" and old.name != name and old.name.startswith(learner_set(ids) + "-") \
                    and _dominated(old, batches):
                self.remove_checkpoint(old.name)
        return name

    # -- experiment records ------------------------------------------------------------------------------

    def experiments(self) -> dict[str, dict[str, Any]]:
        """Experiment name -> its newest record (the attrs of ``experiments/<time>-<hex>``), names in the order
        they were first recorded. A store written before records existed has none."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.layout.names("experiment"):
            try:
                attrs = dict(zarr.open_group(self.layout.experiments / name, mode="r").attrs)
            except (FileNotFoundError, KeyError):
                continue
            out[attrs["experiment"]] = attrs
        return out

    def record_experiment(self, record: Mapping[str, Any]) -> str | None:
        """Add ``record`` ({"experiment": name, "learner_ids": [...], ...}, JSON) unless the newest record of its
        name holds the same; returns the new record's folder name (None: nothing written). Records, like batches,
        are written aside and renamed into place, and never changed."""
        record = json.loads(json.dumps(dict(record)))  # plain JSON, as it will be read back
        newest = self.experiments().get(record["experiment"])
        if newest is not None and {k: v for k, v in newest.items() if k != "kind"} == record:
            return None
        self.create()
        stamp = time.time_ns()
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.localtime(stamp // 10**9))}.{stamp % 10**9:09d}-{uuid.uuid4().hex[:8]}"
        target = self._folder(EXPERIMENTS) / name
        pending = self._folder(PENDING) / f"experiment-{name}"
        with self.writing(f"the record of the experiment {record['experiment']!r}", pending), locks.aside(target, pending):
            zarr.create_group(pending, zarr_format=3, attributes={"kind": "experiment", **record})
        return name

    def remove_checkpoint(self, name: str) -> None:
        path = self.layout.checkpoint(name)
        if not path.exists():
            return
        with self.writing("the removal of a checkpoint", path):
            trash = self._folder(PENDING) / f"removed-{name}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(path, trash)  # out of sight in one step, then deleted
            except FileNotFoundError:
                return
            shutil.rmtree(trash, ignore_errors=True)

    def _write_group(self, folder: str, name: str, ids, configs, steps, metrics, per_learner, metric_keys,
                     attrs: dict, states: Mapping[int, FlatState], dims=None, labels=None) -> str:
        self.create()
        target = self._folder(folder) / name
        pending = self._folder(PENDING) / name
        n = len(ids)
        arrays = {"learner": (("learner",), np.arange(n, dtype=np.int64)),
                  "step": (("step",), np.asarray(steps, dtype=np.int64).reshape(len(steps)))}
        dim_labels: dict[str, list] = {}
        for k, v in metrics.items():
            v = np.asarray(v, dtype=np.float64).reshape(n, len(steps), *np.shape(v)[2:])
            own = tuple((dims or {}).get(k, ())) or tuple(f"{k}_dim{i}" for i in range(v.ndim - 2))
            arrays[k] = (("learner", "step") + own, v)
            for dim, size in zip(own, v.shape[2:], strict=True):
                given = (labels or {}).get(dim)
                dim_labels.setdefault(dim, list(range(size)) if given is None else [_plain_label(x) for x in given])
                arrays.setdefault(dim, ((dim,), np.arange(size, dtype=np.int64)))
        arrays.update({k: (("learner",), np.asarray(v).reshape(n)) for k, v in (per_learner or {}).items()})
        attrs = {"learner_ids": list(ids), "configs": [dict(c) for c in configs], "steps": [int(s) for s in steps],
                 "metric_keys": _keys_attr(metric_keys, metrics, n), "dim_labels": dim_labels,
                 "state_steps": sorted(int(s) for s in states), **attrs}
        with self.writing(f"the {attrs['kind']} {name}", pending), locks.aside(target, pending):
            group = zarr.create_group(pending, zarr_format=3, attributes=attrs)
            for key, (dims, values) in arrays.items():
                group.create_array(key, data=values, chunks=tuple(max(1, d) for d in values.shape), dimension_names=list(dims),
                                   chunk_key_encoding=FLAT_CHUNK_KEYS, compressors=integrity.CODECS,
                                   fill_value=np.nan if values.dtype.kind == "f" else None)
            for step, state in states.items():
                _write_state(group, StoreLayout.state_group(step), state)
            integrity.seal(pending)
        self.__dict__.setdefault("_verified", {})[str(target)] = Source(attrs["kind"], name, target,
                                                                        integrity.read_attributes(target))
        return name

    # -- reading -----------------------------------------------------------------------------------------

    def _open(self, source: Source) -> xr.Dataset:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)
            return xr.open_zarr(source.path, consolidated=False)

    def read(self, requests: Sequence[Request], metrics: Sequence[str] | None = None,
             checkpoints: bool = False) -> xr.Dataset:
        """Metrics of the requested learners: dims (learner, step, *the metric's own dims) over the union of
        their steps (and of the own dims' labels), NaN where a learner has no such step; the value at a step is
        the oldest source's that holds it (batches before checkpoints; these only with ``checkpoints=True``).
        ``diverged_at`` (learner,) is the step whose loss was first non-finite, if before the learner's last
        requested step, else -1."""
        steps = sorted({int(s) for _, st, _ in requests for s in st})
        names = list(metrics) if metrics is not None else list(dict.fromkeys(m for _, _, k in requests for m in k))
        column = {s: i for i, s in enumerate(steps)}
        members: dict[str, list[tuple[int, int]]] = {}
        for row, (learner_id, _, _) in enumerate(requests):
            for source, position in self.holders(learner_id, checkpoints):
                members.setdefault(source.name, []).append((row, position))
        sources = [s for s in self.sources(checkpoints) if s.name in members]
        own, labels = self._own_dims(sources, names)
        order = {d: {v: i for i, v in enumerate(values)} for d, values in labels.items()}
        shape = {m: tuple(len(labels[d]) for d in own.get(m, ())) for m in names}
        out = {m: np.full((len(requests), len(steps), *shape[m]), np.nan) for m in names}
        filled = {m: np.zeros((len(requests), len(steps)), dtype=bool) for m in names}
        diverged = np.full(len(requests), -1, dtype=np.int64)
        for source in sources:
            rows = members[source.name]
            positions = sorted({p for _, p in rows})
            at = {p: i for i, p in enumerate(positions)}
            wanted = {m for row, p in rows for m, key in requests[row][2].items() if m in out and _serves(source, m, key, p)}
            try:
                ds = self._open(source)
                stored = [column.get(int(s), -1) for s in ds["step"].values]
                values = {m: ds[m].isel(learner=positions).values for m in wanted if m in ds}
                stored_diverged = ds["diverged_at"].isel(learner=positions).values if "diverged_at" in ds else None
                ds.close()
            except Exception as error:  # a chunk that fails its checksum, metadata that is not JSON...
                raise self.damaged(source, error) from error
            for row, position in rows:
                learner_id, st, keys = requests[row]
                asked = {column[int(s)] for s in st}
                for m, block in values.items():
                    if m not in keys or not _serves(source, m, keys[m], position):
                        continue
                    where = [[order[d][_plain_label(v)] for v in source.dim_labels.get(d, range(block.shape[2 + i]))]
                             for i, d in enumerate(own.get(m, ()))]
                    for i, c in enumerate(stored):
                        if c in asked and not filled[m][row, c]:
                            out[m][(row, c, *np.ix_(*where))] = block[at[position], i]
                            filled[m][row, c] = True
                if stored_diverged is not None:
                    d, last = int(stored_diverged[at[position]]), max((int(s) for s in st), default=0)
                    if 0 <= d < last and (diverged[row] < 0 or d < diverged[row]):
                        diverged[row] = d
        variables = {m: (("learner", "step", *own.get(m, ())), v) for m, v in out.items()}
        variables["diverged_at"] = (("learner",), diverged)
        ids = np.array([r[0] for r in requests], dtype=object)
        coords = {"learner": ids, "step": np.array(steps, dtype=np.int64)}
        coords.update({d: np.asarray(values, dtype=object if any(isinstance(v, str) for v in values) else None)
                       for d, values in labels.items()})
        return xr.Dataset(variables, coords=coords)

    def _own_dims(self, sources: Sequence[Source], names: Sequence[str]) -> tuple[dict[str, tuple], dict[str, list]]:
        """Each metric's own dimensions (from the sources' arrays' attributes) and the union of their labels."""
        own: dict[str, tuple] = {}
        labels: dict[str, dict] = {}
        for source in sources:
            for m in names:
                if m in own or m not in source.metric_keys:
                    continue
                try:
                    array = zarr.open_array(source.path / m, mode="r")
                except (FileNotFoundError, KeyError, ValueError):
                    continue
                own[m] = tuple(array.metadata.dimension_names or ())[2:]
            for d, values in source.dim_labels.items():
                labels.setdefault(d, {}).update((_plain_label(v), None) for v in values)
        return own, {d: list(v) for d, v in labels.items()}

    def read_states(self, locations: Sequence[tuple[Source, int, int]]) -> list[FlatState]:
        """The full states at (source, position, step): one {path: (array, torch dtype)} per location."""
        out: list[FlatState | None] = [None] * len(locations)
        grouped: dict[tuple[str, int], list[tuple[int, int]]] = {}
        paths: dict[tuple[str, int], Path] = {}
        for i, (source, position, step) in enumerate(locations):
            grouped.setdefault((source.name, step), []).append((i, position))
            paths[(source.name, step)] = source.path
        sources = {source.name: source for source, _, _ in locations}
        for (name, step), members in grouped.items():
            source, where = sources[name], StoreLayout.state_group(step)
            positions = sorted({p for _, p in members})
            at = {p: k for k, p in enumerate(positions)}
            problem = integrity.problem(source.path, source.attrs, under=where)  # no chunk read as Zarr's fill value
            if problem is not None:
                raise self.damaged(source, problem)
            try:
                group = zarr.open_group(paths[(name, step)] / where, mode="r")
                arrays = {}
                for path, node in group.members(max_depth=None):
                    if isinstance(node, zarr.Array):
                        arrays[path] = (node.get_orthogonal_selection((positions,)), node.attrs["torch_dtype"])
            except Exception as error:  # a chunk that fails its checksum, metadata that is not JSON...
                raise self.damaged(source, integrity.unreadable(source.path, under=where) or error) from error
            for i, position in members:
                out[i] = {path: (values[at[position]], dtype) for path, (values, dtype) in arrays.items()}
        return out  # type: ignore[return-value]

    # -- cleaning ----------------------------------------------------------------------------------------

    def clean(self, claims: locks.Claims | None = None) -> list[str]:
        """Remove what killed processes left: folders half-written under ``.pending``, their lock files, claim
        files, and checkpoints that batches (or newer checkpoints) make redundant. What a live process is
        writing or training is left alone. Best effort: what cannot be removed stays. Returns what was removed."""
        removed: list[str] = []
        try:
            removed += [str(p) for p in self._clean_asides()]
            if not self.path.is_dir():
                return removed
            pending = self.layout.pending
            if pending.is_dir():
                removed += [str(p) for p in locks.remove_left_behind(p for p in pending.iterdir() if p.is_dir())]
                locks.remove_free_lock_files(p for p in pending.glob("*" + locks.LOCK_SUFFIX)
                                             if not p.with_name(p.name.removesuffix(locks.LOCK_SUFFIX)).exists())
            claimed = self.layout.claims
            if claimed.is_dir():
                locks.remove_free_lock_files(claimed.glob("*" + locks.LOCK_SUFFIX))
            removed += self.prune_checkpoints(claims)
        except OSError:
            pass
        return removed

    def prune_checkpoints(self, claims: locks.Claims | None = None) -> list[str]:
        """Remove each checkpoint all of whose observations and states batches or newer kept checkpoints also
        hold, unless another live process has claimed one of its learners."""
        sources = self.sources()
        batches = [s for s in sources if s.kind == "batch"]
        checkpoints = sorted((s for s in sources if s.kind == "checkpoint"), key=lambda s: -s.attrs.get("step", 0))
        kept: list[Source] = []
        removed = []
        for checkpoint in checkpoints:
            others = batches + kept
            if _dominated(checkpoint, others) and not any(
                    (claims.held_elsewhere(i) if claims is not None else locks.held(self.layout.claim(i)))
                    for i in checkpoint.ids):
                self.remove_checkpoint(checkpoint.name)
                removed.append(checkpoint.name)
            else:
                kept.append(checkpoint)
        return removed

    def claims(self) -> locks.Claims:
        return locks.Claims(self._folder(CLAIMS))


class _Writing:
    """Turns an ``OSError`` while writing into a ``StoreWriteError`` naming the path and the cause."""

    HINTS = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some of your disk quota",
             errno.EACCES: "restore write permission", errno.EPERM: "restore write permission",
             errno.EROFS: "use a writable file system"}

    def __init__(self, store: Store, what: str, path: Path):
        self.store, self.what, self.path = store, what, path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if error is None or not isinstance(error, OSError) or isinstance(error, StoreWriteError):
            return False
        where = error.filename or self.path
        cause = error.strerror or str(error)
        hint = self.HINTS.get(error.errno, "fix the cause")
        raise StoreWriteError(
            f"Could not write {self.what} to the store: {cause} ({where}). The store {self.store.path} still holds "
            f"everything written before; {hint} and run again: it goes on from there.", error, where) from error


def learner_set(ids: Iterable[str]) -> str:
    """A short name for a set of learner ids (order does not matter)."""
    return hashlib.blake2b("\n".join(sorted(ids)).encode(), digest_size=8).hexdigest()


def _holders(sources: Sequence[Source]) -> dict[str, list[tuple[Source, int]]]:
    found: dict[str, list[tuple[Source, int]]] = {}
    for source in sources:
        for position, learner_id in enumerate(source.ids):
            found.setdefault(learner_id, []).append((source, position))
    return found


def _serves(source: Source, metric: str, key: str | None, position: int) -> bool:
    return metric in source.metric_keys and (key is None or source.key(metric, position) == key)


def _keys_attr(metric_keys: Any, metrics: Mapping[str, Any], n: int) -> dict[str, str | list[str]]:
    """metric_keys as stored: one digest per metric, or a list of digests (one per learner) where they differ."""
    if metric_keys is None:
        return {k: k for k in metrics}
    if isinstance(metric_keys, Mapping):
        return dict(metric_keys)
    per_learner = list(metric_keys)
    if len(per_learner) != n:
        raise ValueError(f"metric_keys: {len(per_learner)} dicts for {n} learners.")
    out: dict[str, str | list[str]] = {}
    for m in per_learner[0] if per_learner else {}:
        values = [k[m] for k in per_learner]
        out[m] = values[0] if len(set(values)) == 1 else values
    return out


def _plain_label(value: Any) -> Any:
    """A JSON-able label (numpy numbers as Python numbers)."""
    return value.item() if hasattr(value, "item") and not isinstance(value, str) else value


def _dominated(checkpoint: Source, others: Sequence[Source]) -> bool:
    """Whether ``others`` hold every metric value of ``checkpoint``, every state it keeps at an earlier step, and a
    state at or after its own step."""
    resume = int(checkpoint.attrs.get("step", max(checkpoint.state_steps, default=-1)))
    for position, learner_id in enumerate(checkpoint.ids):
        holding = [(s, s.ids.index(learner_id)) for s in others if learner_id in s.ids]
        for metric in checkpoint.metric_keys:
            key = checkpoint.key(metric, position)
            held = {int(t) for s, p in holding if s.key(metric, p) == key for t in s.steps}
            if not {int(t) for t in checkpoint.steps} <= held:
                return False
        states = {int(t) for s, _ in holding for t in s.state_steps}
        if max(states, default=-1) < resume or not {int(t) for t in checkpoint.state_steps if int(t) < resume} <= states:
            return False
    return True


def _write_state(group: zarr.Group, prefix: str, state: FlatState) -> None:
    for path, (values, torch_dtype) in state.items():
        values = np.ascontiguousarray(values)
        n = values.shape[0]
        per_learner = max(1, values[0].nbytes if n else 1)
        chunk = max(1, min(n, STATE_CHUNK_BYTES // per_learner))
        leaf = path.rsplit("/", 1)[-1]
        array = group.create_array(f"{prefix}/{path}", shape=values.shape, dtype=values.dtype,
                                   chunks=(chunk, *values.shape[1:]), chunk_key_encoding=FLAT_CHUNK_KEYS,
                                   dimension_names=["learner", *(f"{leaf}.{i}" for i in range(1, values.ndim))],
                                   attributes={"torch_dtype": torch_dtype}, compressors=integrity.CODECS)
        array[...] = values


# -- reading a whole store, without this library's code --------------------------------------------------

def open_store(path: str | os.PathLike, experiment: str | None = None) -> xr.Dataset:
    """Every learner in the store's batches (or, with ``experiment``, those of the experiment of that name) as one
    Dataset: dims ``learner`` (ids) and ``step``; one data
    variable per metric (``name`` or, when the store holds one metric name computed two ways, e.g. on two
    test sets, ``name@<digest>``), ``diverged_at`` (learner; -1: never) and ``has_state`` (learner, step:
    whether a full state is kept there, for ``load_learner``). Each learner's configuration is flattened into
    coordinates along ``learner``: its grid coordinates (``epsilon``, ``init_seed``...), its optimizer and
    hyperparameters, ``model``, ``dataset``, ``batch_size``, ``control``, ``experiment_seed``, where it was
    trained (``device``, ``device_name``, ``torch``, ``python``) and the whole ``config`` as JSON. Reads JSON
    attributes and arrays only: no code runs, nothing is unpickled.
    """
    store = Store(path)
    if not store.layout.mark.is_file():
        raise StoreError(f"{store.path} is not a serimats-func store (no zarr.json).")
    store.check()
    return store.retrying(lambda: _open_store(store, experiment))


def _open_store(store: Store, experiment: str | None) -> xr.Dataset:
    batches = store.sources(checkpoints=False)
    ids = list(dict.fromkeys(i for b in batches for i in b.ids))
    if experiment is not None:
        records = store.experiments()
        if experiment not in records:
            raise StoreError(f"{store.path} holds no experiment named {experiment!r}; it holds: "
                             f"{', '.join(repr(n) for n in records) or 'none'}.")
        named = set(records[experiment]["learner_ids"])
        ids = [i for i in ids if i in named]
        batches = [b for b in batches if named & set(b.ids)]
    by_name: dict[str, set[str]] = {}
    wanted = set(ids)
    for b in batches:
        for metric in b.metric_keys:
            by_name.setdefault(metric, set()).update(b.key(metric, p) for p, i in enumerate(b.ids) if i in wanted)
    variables = {(m, k): (m if len(keys) == 1 else f"{m}@{k}") for m, keys in by_name.items() for k in keys}
    own, labels = store._own_dims(batches, list(by_name))
    order = {d: {v: i for i, v in enumerate(values)} for d, values in labels.items()}
    steps = sorted({int(s) for b in batches for s in list(b.steps) + list(b.state_steps)})
    row = {i: r for r, i in enumerate(ids)}
    column = {s: c for c, s in enumerate(steps)}
    dims_of = {v: own.get(m, ()) for (m, _), v in variables.items()}
    values = {v: np.full((len(ids), len(steps), *(len(labels[d]) for d in dims_of[v])), np.nan) for v in variables.values()}
    filled = {v: np.zeros((len(ids), len(steps)), dtype=bool) for v in variables.values()}
    has_state = np.zeros((len(ids), len(steps)), dtype=bool)
    diverged = np.full(len(ids), -1, dtype=np.int64)
    info: dict[str, dict[str, Any]] = {}
    for b in batches:
        members = [(p, row[i]) for p, i in enumerate(b.ids) if i in row]  # (position in the batch, row)
        positions, rows = np.array([p for p, _ in members]), np.array([r for _, r in members])
        cols = [column[int(s)] for s in b.steps]
        for s in b.state_steps:
            has_state[rows, column[int(s)]] = True
        try:
            ds = store._open(b)
            blocks = {m: ds[m].values for m in b.metric_keys if m in ds}  # (learners of the batch, its steps, *own dims)
            d = ds["diverged_at"].values if "diverged_at" in ds else None
            ds.close()
        except Exception as error:  # a chunk that fails its checksum...
            raise store.damaged(b, error) from error
        for metric, block in blocks.items():
            where = [[order[d][_plain_label(v)] for v in b.dim_labels.get(d, range(block.shape[2 + i]))]
                     for i, d in enumerate(own.get(metric, ()))]
            for position, r in members:
                name = variables[(metric, b.key(metric, position))]
                for i, c in enumerate(cols):
                    if not filled[name][r, c]:
                        values[name][(r, c, *np.ix_(*where))] = block[position, i]
                        filled[name][r, c] = True
        if d is not None:
            d = d[positions]
            diverged[rows] = np.where((d >= 0) & ((diverged[rows] < 0) | (d < diverged[rows])), d, diverged[rows])
        for learner_id, config in zip(b.ids, b.attrs["configs"], strict=True):
            if learner_id not in row:
                continue
            info.setdefault(learner_id, {**_flat_config(config),
                                         **{k: b.attrs.get(k) for k in ENVIRONMENT}})
    coords: dict[str, Any] = {"learner": np.array(ids, dtype=str), "step": np.array(steps, dtype=np.int64)}
    names = list(dict.fromkeys(k for i in ids for k in info[i]))
    for name in names:
        coords[name] = ("learner", _column([info[i].get(name) for i in ids]))
    coords.update({d: np.asarray(v, dtype=object if any(isinstance(x, str) for x in v) else None) for d, v in labels.items()})
    data = {v: (("learner", "step", *dims_of[v]), values[v]) for v in values}
    data["diverged_at"] = (("learner",), diverged)
    data["has_state"] = (("learner", "step"), has_state)
    return xr.Dataset(data, coords=coords, attrs={"store": str(store.path), "format": FORMAT})


def _flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (config.get("optimizer") or {}).items():
        out[k] = v
    out.update(config.get("coords") or {})
    out["experiment_seed"] = config.get("seed")
    for k in ("model", "dataset", "batch_size", "control"):
        if k in config:
            out[k] = config[k]
    out["config"] = json.dumps(config, sort_keys=True)
    return out


def _column(values: list) -> np.ndarray:
    """One coordinate along ``learner``: numbers (NaN where a learner lacks it), else strings ("" where absent)."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present) and len(present) == len(values):
        return np.array(values, dtype=bool)
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return np.array([np.nan if v is None else v for v in values], dtype=float if len(present) < len(values) or any(
            isinstance(v, float) for v in present) else np.int64)
    return np.array(["" if v is None else (v if isinstance(v, str) else json.dumps(v)) for v in values], dtype=str)

