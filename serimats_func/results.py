"""From stored learners to a labelled result: one dimension per varied axis, plus ``step``.

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

import numpy as np
import xarray as xr

from .grid import Grid
from .metrics import DEFAULT_METRICS


def _labels(values: list) -> np.ndarray:
    """Coordinate labels; ``None`` (an axis a learner does not have) becomes NaN for numbers."""
    present = [v for v in values if v is not None]
    if len(present) == len(values):
        return np.array(values)
    if present and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in present):
        return np.array([np.nan if v is None else v for v in values], dtype=float)
    return np.array(values, dtype=object)


def assemble(grid: Grid, stored: xr.Dataset, steps: Sequence[int], attrs: dict | None = None,
             order: Sequence[str] = DEFAULT_METRICS, controls: bool = False) -> xr.Dataset:
    """Lay the stored learners (dims learner, step) out on the grid's dimensions, over ``steps``; metrics
    come in ``order``, then any others."""
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
        values = np.full(shape + (len(steps),), np.nan)
        source = stored[name].values[rows[filled]]  # (filled cells, stored steps)
        present = take >= 0
        block = np.full((source.shape[0], len(steps)), np.nan)
        block[:, present] = source[:, take[present]]
        values[filled] = block
        data_vars[name] = (dims + ["step"], values)
    diverged = np.full(shape, np.nan)
    if "diverged_at" in stored:
        at = stored["diverged_at"].values[rows[filled]].astype(float)
        diverged[filled] = np.where(at >= 0, at, np.nan)
    data_vars["diverged_at"] = (dims, diverged)
    coords = {name: _labels(labels) for name, labels in grid.dims.items()}
    coords["step"] = steps
    coords["learner"] = (dims, ids.astype(str))
    coords["control"] = (dims, control)
    if controls:
        coords["control_learner"] = (dims, control_ids.astype(str))
    coords.update(grid.scalars)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs or {})
