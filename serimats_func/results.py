"""From stored learners to a labelled result: one dimension per varied axis, plus ``step``.

Cells of the grid that hold no learner are NaN, never invented. Non-dimension coordinates:
``learner`` (the id in the store, "" for empty cells) and ``control``; axes that were named but
took one value are scalar coordinates.
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


def assemble(grid: Grid, stored: xr.Dataset, attrs: dict | None = None, order: Sequence[str] = DEFAULT_METRICS) -> xr.Dataset:
    """Lay the stored learners (dims learner, step) out on the grid's dimensions; metrics come
    in ``order``, then any others."""
    dims = list(grid.dims)
    shape = tuple(len(v) for v in grid.dims.values())
    steps = stored["step"].values
    position = {learner_id: i for i, learner_id in enumerate(stored["learner"].values.tolist())}
    ids = np.full(shape, "", dtype=object)
    control = np.zeros(shape, dtype=bool)
    rows = np.full(shape, -1, dtype=np.int64)
    for cell, spec in grid.cells:
        ids[cell], control[cell], rows[cell] = spec.id, spec.control, position[spec.id]
    filled = rows >= 0
    data_vars = {}
    known = [m for m in order if m in stored.data_vars]
    for name in known + [m for m in stored.data_vars if m not in known]:
        var = stored[name]
        values = np.full(shape + (len(steps),), np.nan)
        values[filled] = var.values[rows[filled]]
        data_vars[name] = (dims + ["step"], values)
    coords = {name: _labels(labels) for name, labels in grid.dims.items()}
    coords["step"] = steps
    coords["learner"] = (dims, ids.astype(str))
    coords["control"] = (dims, control)
    coords.update(grid.scalars)
    return xr.Dataset(data_vars, coords=coords, attrs=attrs or {})
