"""Plots from a result ``xarray.Dataset``: a metric against step, one line per value of a
coordinate, mean and spread over the seeds.

>>> import numpy as np, xarray as xr
>>> ds = xr.Dataset({"test_acc": (("epsilon", "seed", "step"), np.random.rand(2, 3, 4))},
...                 coords={"epsilon": [0.0, 0.1], "seed": [0, 1, 2], "step": [0, 1, 2, 3]})
>>> fig = Plotter(ds).curves("test_acc")
>>> [line.get_label() for line in fig.axes[0].get_lines()]
['epsilon=0.0', 'epsilon=0.1']
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

PRETTY = {"train_loss": "train loss", "train_acc": "train accuracy", "test_loss": "test loss", "test_acc": "test accuracy"}


class Plotter:
    def __init__(self, ds: xr.Dataset):
        self.ds = ds

    def default_hue(self) -> str | None:
        """The first dimension that is not a seed (``seed``, ``init_seed``...) nor ``step``."""
        metric = next(m for m in self.ds.data_vars if "step" in self.ds[m].dims)
        for dim in self.ds[metric].dims:
            if dim != "step" and not dim.endswith("seed"):
                return dim
        return None

    def curves(self, metric: str = "test_acc", hue: str | None = None, ax=None) -> Figure:
        """``metric`` against step: a line per value of ``hue`` (default: the first non-seed
        dimension), the mean over every other dimension, shaded +- one standard deviation."""
        hue = hue or self.default_hue()
        data = self.ds[metric]
        if ax is None:
            fig = Figure(figsize=(6, 4), layout="constrained")
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        groups = [(f"{hue}={v}", data.sel({hue: v})) for v in data[hue].values] if hue else [(metric, data)]
        for label, part in groups:
            others = [d for d in part.dims if d != "step"]
            values = part.values.reshape(-1, part.sizes["step"]) if others else part.values[None]
            values = values[~np.all(np.isnan(values), axis=1)]
            if len(values) == 0:
                continue
            mean, std = values.mean(axis=0), values.std(axis=0)
            steps = part["step"].values
            (line,) = ax.plot(steps, mean, label=label)
            if len(values) > 1:
                ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel(PRETTY.get(metric, metric))
        if hue:
            ax.legend(title=None, fontsize="small")
        return fig

    def save(self, path: str | Path, metric: str = "test_acc", hue: str | None = None) -> Path:
        """Draw ``curves`` into a PNG file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.curves(metric, hue).savefig(path, dpi=120)
        return path

    def save_all(self, folder: str | Path) -> list[Path]:
        """One PNG per metric in ``folder``."""
        return [self.save(Path(folder) / f"{m}.png", m) for m in self.ds.data_vars if "step" in self.ds[m].dims]
