"""From stored learners to a labelled result: one dimension per varied axis, plus ``step``, plus a metric's
own dimensions last (``layer`` for ``control_layer_distance``; those a custom metric names).

Cells of the grid that hold no learner are NaN, never invented. Non-dimension coordinates:
``learner`` (the id in the store, "" for empty cells), ``control`` (whether the cell's learner is a
control) and, when the experiment has controls, ``control_learner`` (the id of each learner's control);
axes that were named but took one value are scalar coordinates. ``diverged_at`` (no step dimension) is
the step whose training loss was first non-finite, NaN for learners that never diverged; their metrics
are NaN from then on.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

from ..core.metrics import METRICS
from ..store.zarr_store import Store
from .grid import Grid


def _labels(values: list) -> np.ndarray:
    """Coordinate labels; ``None`` (an axis a learner does not have) becomes NaN for numbers."""
    present = [v for v in values if v is not None]
    if len(present) == len(values):
        return np.array(values)
    if present and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in present):
        return np.array([np.nan if v is None else v for v in values], dtype=float)
    return np.array(values, dtype=object)


def assemble(grid: Grid, stored: xr.Dataset, steps: Sequence[int], attrs: dict | None = None,
             order: Sequence[str] | None = None, controls: bool = False) -> xr.Dataset:
    """Lay the stored learners (dims learner, step) out on the grid's dimensions, over ``steps``; metrics
    come in ``order`` (default: the built-in metrics' order, ``metrics.METRICS``), then any others."""
    order = list(METRICS) if order is None else order
    dims = list(grid.dims)
    shape = tuple(len(v) for v in grid.dims.values())
    steps = np.asarray(steps, dtype=np.int64)
    position = {learner_id: i for i, learner_id in enumerate(stored["learner"].values.tolist())}
    column = {int(s): i for i, s in enumerate(stored["step"].values)}
    take = np.array([column.get(int(s), -1) for s in steps])
    ids = np.full(shape, "", dtype=object)
    control_ids = np.full(shape, "", dtype=object)
    control = np.zeros(shape, dtype=bool)
    rows = np.full(shape, -1, dtype=np.int64)
    for cell, spec in grid.cells:
        ids[cell], control[cell], rows[cell] = spec.id, spec.control, position[spec.id]
        control_ids[cell] = spec.control_id or ""
    filled = rows >= 0
    data_vars = {}
    metrics = [m for m in stored.data_vars if "step" in stored[m].dims]
    known = [m for m in order if m in metrics]
    for name in known + [m for m in metrics if m not in known]:
        own = list(stored[name].dims[2:])
        own_shape = tuple(stored.sizes[d] for d in own)
        values = np.full(shape + (len(steps),) + own_shape, np.nan)
        source = stored[name].values[rows[filled]]  # (filled cells, stored steps, *own)
        present = take >= 0
        block = np.full((source.shape[0], len(steps)) + own_shape, np.nan)
        block[:, present] = source[:, take[present]]
        values[filled] = block
        data_vars[name] = (dims + ["step"] + own, values)
    diverged = np.full(shape, np.nan)
    if "diverged_at" in stored:
        at = stored["diverged_at"].values[rows[filled]].astype(float)
        diverged[filled] = np.where(at >= 0, at, np.nan)
    data_vars["diverged_at"] = (dims, diverged)
    off = steps.astype(float) >= diverged[..., None]  # (*grid, steps): from the divergence on, in any batch
    for name, (_, values) in list(data_vars.items()):
        if name != "diverged_at":
            values[np.broadcast_to(off.reshape(off.shape + (1,) * (values.ndim - off.ndim)), values.shape)] = np.nan
    coords = {name: _labels(labels) for name, labels in grid.dims.items()}
    coords["step"] = steps
    coords.update({d: stored[d].values for d in stored.dims if d not in ("learner", "step")})
    coords["learner"] = (dims, ids.astype(str))
    coords["control"] = (dims, control)
    if controls:
        coords["control_learner"] = (dims, control_ids.astype(str))
    coords.update(grid.scalars)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs or {})


@dataclass(frozen=True)
class _Stored:
    """A stored learner, as ``assemble`` reads it."""

    id: str
    control: bool
    control_id: str | None = None


def experiment_record(name: str, grid: Grid) -> dict:
    """What the store records of an experiment named ``name``: its learners and their place in its grid (labels,
    cells, controls), so that ``store_results(store, name)`` lays them out as ``Experiment.results()`` does."""
    return {"experiment": name, "dims": {d: [_plain(v) for v in labels] for d, labels in grid.dims.items()},
            "scalars": {k: _plain(v) for k, v in grid.scalars.items()},
            "learner_ids": [spec.id for _, spec in grid.cells], "cells": [list(cell) for cell, _ in grid.cells],
            "control": [bool(spec.control) for _, spec in grid.cells],
            "control_learner": [spec.control_id or "" for _, spec in grid.cells]}


def _plain(label):
    """A label as JSON keeps it (numpy numbers as Python numbers, anything else not JSON as its text)."""
    label = label.item() if hasattr(label, "item") and not isinstance(label, str) else label
    return label if isinstance(label, (str, int, float, bool, type(None))) else str(label)


def store_results(store: Store, experiment: str | None = None) -> xr.Dataset:
    """The learners of ``store`` laid out on coordinates, over every step stored for them: with ``experiment`` (a
    name the store records), that experiment's learners on its own grid, as its ``results()`` lays them out;
    without, every learner of the store on the coordinates its configuration names (one dimension per coordinate
    with several values). A learner stored in several batches is read from all of them (the oldest value at a step).
    Without ``experiment``, two learners with the same coordinates (they differ in something that is not a
    coordinate, such as the model) are refused: name the experiment, or open them through their ``Experiment``."""
    return store.retrying(lambda: _store_results(store, experiment))


def _store_results(store: Store, experiment: str | None) -> xr.Dataset:
    steps_of: dict[str, set[int]] = {}
    configs: dict[str, dict] = {}
    metrics: list[str] = []
    for source in store.sources(checkpoints=False):
        for learner_id, config in zip(source.ids, source.attrs["configs"], strict=True):
            steps_of.setdefault(learner_id, set()).update(int(s) for s in source.steps)
            configs.setdefault(learner_id, config)
        metrics += [m for m in source.metric_keys if m not in metrics]
    chosen = {i: sorted(st) for i, st in steps_of.items()}
    attrs = {"store": str(store.path)}
    if experiment is not None:
        grid = _recorded_grid(store, experiment, chosen)
        attrs["experiment"] = experiment
    else:
        if not chosen:
            raise ValueError(f"{store.path} holds no learner yet.")
        grid = _grid_of_configs(store, configs, chosen)
    mine = list(dict.fromkeys(spec.id for _, spec in grid.cells))
    held = {m for i in mine for source, _ in store.holders(i, checkpoints=False) for m in source.metric_keys}
    metrics = [m for m in METRICS if m in held] + [m for m in metrics if m in held and m not in METRICS]
    stored = store.read([(i, chosen[i], dict.fromkeys(metrics)) for i in mine], metrics)
    steps = sorted({s for i in mine for s in chosen[i]})
    return assemble(grid, stored, steps, attrs, order=metrics,
                    controls=any(spec.control_id for _, spec in grid.cells))


def _recorded_grid(store: Store, experiment: str, chosen: dict[str, list[int]]) -> Grid:
    """The grid of the experiment named ``experiment`` as the store records it, with only its stored learners."""
    records = store.experiments()
    if experiment not in records:
        raise ValueError(f"{store.path} holds no experiment named {experiment!r}; it holds: "
                         f"{', '.join(repr(n) for n in records) or 'none (it was written before experiments were recorded)'}.")
    record = records[experiment]
    grid = Grid(dims=dict(record["dims"]), scalars=dict(record["scalars"]))
    for learner_id, cell, control, control_id in zip(record["learner_ids"], record["cells"], record["control"],
                                                     record["control_learner"], strict=True):
        if learner_id in chosen:
            grid.cells.append((tuple(cell), _Stored(learner_id, control, control_id or None)))
    if not grid.cells:
        raise ValueError(f"{store.path} holds no learner of the experiment {experiment!r} yet.")
    return grid


def _grid_of_configs(store: Store, configs: dict[str, dict], chosen: dict[str, list[int]]) -> Grid:
    labelled = [(configs[i].get("coords", {}), _Stored(i, bool(configs[i].get("control", False)))) for i in chosen]
    names = list(dict.fromkeys(name for coords, _ in labelled for name in coords))
    labels = {n: _ordered(list(dict.fromkeys(coords.get(n) for coords, _ in labelled))) for n in names}
    dims = {n: v for n, v in labels.items() if len(v) > 1}
    grid = Grid(dims=dims, scalars={n: v[0] for n, v in labels.items() if len(v) == 1})
    seen: dict[tuple[int, ...], str] = {}
    for coords, spec in labelled:
        cell = tuple(dims[n].index(coords.get(n)) for n in dims)
        if cell in seen:
            where = ", ".join(f"{n}={coords.get(n)!r}" for n in dims) or "no coordinate"
            raise ValueError(f"Learners {seen[cell]} and {spec.id} of {store.path} have the same coordinates ({where}); "
                             "they differ in something that is not a coordinate. Name their experiment (--experiment "
                             "NAME), or read them through their Experiment.")
        seen[cell] = spec.id
        grid.cells.append((cell, spec))
    return grid


def _ordered(labels: list) -> list:
    """Numbers in increasing order (None, no such axis, first); anything else in order of first appearance."""
    if all(v is None or (isinstance(v, numbers.Real) and not isinstance(v, bool)) for v in labels):
        return sorted(labels, key=lambda v: (v is not None, v or 0))
    return labels
