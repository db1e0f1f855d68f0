"""Curves where people look at them: each learner of a result as a TensorBoard run or a Weights & Biases run.

A result is what ``Experiment.results()`` returns or what ``serimats-func`` reads from a store (one dimension
per varied axis, plus ``step``). Each learner becomes one run, named by its coordinates (``epsilon=0.01,seed=3``;
its id when the result has no dimension), with one scalar per metric at each step where it has a value; a metric
with a dimension of its own gives one scalar per label (``control_layer_distance/fc1.weight``).

>>> import numpy as np, xarray as xr
>>> ds = xr.Dataset({"test_acc": (("seed", "step"), [[0.1, 0.5], [0.1, np.nan]])},
...                 coords={"seed": [0, 1], "step": [0, 8], "learner": ("seed", ["a1", "b2"])})
>>> [(run.name, run.learner, run.scalars) for run in learner_runs(ds)]
[('seed=0', 'a1', {'test_acc': [(0, 0.1), (8, 0.5)]}), ('seed=1', 'b2', {'test_acc': [(0, 0.1)]})]
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

EVENT_FILES = "events.out.tfevents.*"  # what a SummaryWriter writes in a run's folder


@dataclass(frozen=True)
class LearnerRun:
    """One learner's curves: its run name, id, coordinates and {tag: [(step, value), ...]} (NaN left out)."""

    name: str
    learner: str
    coords: dict[str, Any] = field(default_factory=dict)
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def learner_runs(ds: xr.Dataset) -> Iterator[LearnerRun]:
    """Every learner of ``ds`` (cells whose ``learner`` is empty hold none), in the order of its cells."""
    dims = [str(d) for d in ds["learner"].dims]
    metrics = [m for m in ds.data_vars if "step" in ds[m].dims]
    steps = [int(s) for s in ds["step"].values]
    seen = set()
    for cell in np.ndindex(*(ds.sizes[d] for d in dims)):
        where = dict(zip(dims, cell, strict=True))
        learner = str(ds["learner"].isel(where).item())
        if not learner or learner in seen:
            continue
        seen.add(learner)
        coords = {d: _plain(ds[d].values[i]) for d, i in where.items()}
        scalars: dict[str, list[tuple[int, float]]] = {}
        for m in metrics:
            values = ds[m].isel(where).transpose("step", ...)
            own = [d for d in values.dims if d != "step"]
            if not own:
                scalars[m] = _points(steps, values.values)
                continue
            for index in np.ndindex(*(values.sizes[d] for d in own)):
                labels = [str(_plain(values[d].values[i])) if d in values.coords else str(i)
                          for d, i in zip(own, index, strict=True)]
                scalars["/".join([m, *labels])] = _points(steps, values.values[(slice(None), *index)])
        yield LearnerRun(run_name(coords) if coords else learner, learner, coords,
                         {tag: points for tag, points in scalars.items() if points})


def run_name(coords: dict[str, Any]) -> str:
    """A run's name from its coordinates, usable as one folder name: ``epsilon=0.01,seed=3``.

    >>> run_name({"layers": "fc1/weight", "when": "0-100"})
    'layers=fc1_weight,when=0-100'
    """
    text = ",".join(f"{k}={v}" for k, v in coords.items())
    return re.sub(r"[/\\\x00-\x1f]", "_", text).lstrip(".") or "learner"


def to_tensorboard(ds: xr.Dataset, out: str | Path) -> list[Path]:
    """Write each learner's metrics as TensorBoard scalars, one run (a folder of ``out``) per learner, with
    ``torch.utils.tensorboard.SummaryWriter``; returns the runs' folders. A run's earlier event files are
    replaced, so exporting again after more training gives one curve per metric, not two. Needs the
    ``tensorboard`` package (``pip install -e ".[tensorboard]"``). View with ``tensorboard --logdir out``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError("Writing TensorBoard runs needs the tensorboard package: pip install -e \".[tensorboard]\" "
                          "(or pip install tensorboard).") from error
    out = Path(out)
    folders = []
    for run in learner_runs(ds):
        folder = out / run.name
        for old in folder.glob(EVENT_FILES):
            old.unlink()
        with SummaryWriter(log_dir=str(folder)) as writer:
            for tag, points in run.scalars.items():
                for step, value in points:
                    writer.add_scalar(tag, value, global_step=step)
        folders.append(folder)
    return folders


def to_wandb(ds: xr.Dataset, project: str = "serimats-func", mode: str = "offline", folder: str | Path | None = None,
             wandb: Any = None) -> int:
    """Log each learner as one Weights & Biases run (name: its coordinates; config: its coordinates and id), its
    metrics with ``run.log({...}, step=step)``; returns how many runs. ``mode="offline"`` (default) writes them
    under ``folder`` (default ``./wandb``) without an account or network; ``wandb sync <folder>/wandb/offline-run-*``
    uploads them later. Needs the ``wandb`` package (``pip install wandb``); ``wandb=`` takes the module itself."""
    if wandb is None:
        try:
            import wandb
        except ImportError as error:
            raise ImportError("Logging to Weights & Biases needs the wandb package: pip install wandb.") from error
    count = 0
    for run in learner_runs(ds):
        by_step: dict[int, dict[str, float]] = {}
        for tag, points in run.scalars.items():
            for step, value in points:
                by_step.setdefault(step, {})[tag] = value
        logged = wandb.init(project=project, name=run.name, mode=mode, dir=None if folder is None else str(folder),
                            config={**run.coords, "learner": run.learner}, group=ds.attrs.get("experiment"))
        for step in sorted(by_step):
            logged.log(by_step[step], step=step)
        logged.finish()
        count += 1
    return count


def _points(steps: list[int], values: np.ndarray) -> list[tuple[int, float]]:
    return [(step, float(v)) for step, v in zip(steps, values, strict=True) if not np.isnan(v)]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
