"""Plots from a result ``xarray.Dataset`` that cannot mislead: nothing is averaged but the seeds.

- ``curves(metric, hue=...)``: the metric against step, one line per value of ``hue``, the mean over every
  seed dimension (``seed``, ``init_seed``, ``perturb_seed``...) with a band of +- one standard deviation,
  and ``n=`` in the legend (learners per line). Any other dimension is a column or row of panels (``col=``,
  ``row=``; given or taken in order) or must be selected (``sel={"lr": 0.01}``): a dimension left over is an
  error, never an average.
- ``scaling(metric="control_distance", hue="epsilon", col="when")``: distance to the control against step on
  log-log axes (steps from 1; controls left out: their distance is 0), one panel per window.
- ``heatmap(metric, x=..., y=..., step=-1)``: the mean over seeds at one step over two coordinates, each cell
  labelled with its value.
- ``save_all(folder)``: all of these as PNG files (what ``Experiment.run(plot=True)`` writes); ``headline()``:
  the few of them that ``run(plot=True)`` also shows in Jupyter (the main metric's curves, the growth of the
  distance to the control).

For heavy tails (a few seeds that blow up), ``curves`` and ``scaling`` take ``stat="mean" | "median" |
"geomean"``, ``band="std" | "quantiles" | (low, high) | None``, ``seeds=True`` (each learner as a thin line)
and ``yscale="log"``; ``scaling`` also ``xscale="linear"``. A coordinate's value has one colour in every plot
of one ``Plotter`` (``Plotter.colours``).

Each method returns a matplotlib ``Figure`` (shown inline in Jupyter), drawn with xarray's plotting.

>>> import numpy as np, xarray as xr
>>> ds = xr.Dataset({"test_acc": (("epsilon", "seed", "step"), np.random.rand(2, 3, 4))},
...                 coords={"epsilon": [0.0, 0.1], "seed": [0, 1, 2], "step": [0, 1, 2, 3]})
>>> fig = Plotter(ds).curves("test_acc")
>>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
['0.0 (n=3)', '0.1 (n=3)']
>>> fig.axes[0].get_ylabel(), fig.axes[0].get_xlabel()
('test accuracy', 'step (updates done)')
>>> fig = Plotter(ds).curves("test_acc", stat="median", band="quantiles", seeds=True, yscale="log")
>>> fig.axes[0].get_yscale(), len([ln for ln in fig.axes[0].get_lines() if ln.get_gid() == "seed"])
('log', 6)
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .core.labels import selects

PRETTY = {
    "train_loss": "train loss", "train_acc": "train accuracy", "test_loss": "test loss", "test_acc": "test accuracy",
    "param_norm": "weight norm ||w||", "init_distance": "distance to init ||w - w0||",
    "init_cosine": "cosine(w, w0)", "control_distance": "distance to control ||w - wc||",
    "control_layer_distance": "distance to control per layer", "control_cosine": "cosine(w, wc)",
    "control_agreement": "agreement with control (test)", "control_test_loss_diff": "test loss - control's",
}
STEP_LABEL = "step (updates done)"
WINDOW_DIMS = ("when", "at")  # a window or step of intervention: one panel each in scaling plots
MAX_LABELLED_CELLS = 100  # heat maps label each cell with its value up to this many cells
MAX_TICKS = 12
MAIN_METRICS = ("test_acc", "train_loss")  # the main metric: the first one a result has
MAX_FACETS = 12  # save_all draws a metric's own dimension with more values as a heat map, not as panels

SCALES = ("linear", "log")  # of the value axis (yscale) and, in scaling plots, the step axis (xscale)


class NothingToDraw(ValueError):
    """The data selected for a plot hold no number."""


class Summary(NamedTuple):
    """What a line and its band show of the learners over the seed dimensions.

    ``stat``: ``mean``, ``median`` or ``geomean`` (``exp(mean(log x))``: positive values only, anything else is
    refused). ``band``: ``std`` (stat +- one std; for ``geomean`` the geometric std, ``g / s`` to ``g * s`` with
    ``s = exp(std(log x))``), ``quantiles`` (from ``quantiles[0]`` to ``quantiles[1]``, 25-75% by default) or None.

    >>> Summary.of("median", (0.1, 0.9)).describe()
    'median, 10-90% quantiles'
    """

    stat: str = "mean"
    band: str | None = "std"
    quantiles: tuple[float, float] = (0.25, 0.75)

    @classmethod
    def of(cls, stat: str = "mean", band: str | tuple[float, float] | None = "std") -> Summary:
        """From what the user wrote: ``band`` may be ``"std"``, ``"quantiles"``, a pair ``(low, high)`` or None."""
        if stat not in ("mean", "median", "geomean"):
            raise ValueError(f"stat={stat!r}: use 'mean', 'median' or 'geomean' (exp of the mean of log over seeds).")
        if band is None or band == "std":
            return cls(stat, band)
        if band == "quantiles":
            return cls(stat, "quantiles")
        if (isinstance(band, Sequence) and not isinstance(band, str) and len(band) == 2
                and all(isinstance(q, int | float) and not isinstance(q, bool) for q in band)
                and 0 <= band[0] < band[1] <= 1):
            return cls(stat, "quantiles", (float(band[0]), float(band[1])))
        raise ValueError(f"band={band!r}: use 'std', 'quantiles' (25-75%), a pair of quantiles such as (0.1, 0.9) "
                         f"(0 <= low < high <= 1), or None (no band).")

    def describe(self) -> str:
        name = "geometric mean" if self.stat == "geomean" else self.stat
        if self.band == "std":
            return f"{name} ×/÷ 1 geometric std" if self.stat == "geomean" else f"{name} ± 1 std"
        if self.band == "quantiles":
            low, high = (f"{100 * q:g}" for q in self.quantiles)
            return f"{name}, {low}-{high}% quantiles"
        return name

    def check(self, da: xr.DataArray, metric: str) -> None:
        """Refuse a geometric mean of values that are not all positive (NaN, a learner without data, aside)."""
        bad = int((da <= 0).sum())
        if self.stat == "geomean" and bad:
            raise ValueError(f"stat='geomean' needs positive values: {metric} has {bad} value(s) <= 0 here (the least "
                             f"{float(da.min()):g}). Use stat='median' (as robust to a heavy tail, and defined for any "
                             f"value), or select learners whose values are positive with sel=.")

    def centre(self, da: xr.DataArray, seeds: list[str]) -> xr.DataArray:
        """The statistic over ``seeds`` (NaN skipped: diverged or missing learners); ``da`` itself without seeds."""
        if not seeds:
            return da
        with _all_nan_quiet():
            if self.stat == "median":
                return da.median(seeds, skipna=True)
            if self.stat == "geomean":
                return np.exp(np.log(da).mean(seeds, skipna=True))
            return da.mean(seeds, skipna=True)

    def edges(self, da: xr.DataArray, seeds: list[str], centre: xr.DataArray) -> tuple[xr.DataArray, xr.DataArray] | None:
        """The band's lower and upper edges, or None (no band, or no seeds to spread over)."""
        if self.band is None or not seeds:
            return None
        with _all_nan_quiet():
            if self.band == "quantiles":
                q = da.quantile(list(self.quantiles), dim=seeds, skipna=True)
                return q.isel(quantile=0, drop=True), q.isel(quantile=1, drop=True)
            if self.stat == "geomean":
                spread = np.exp(np.log(da).std(seeds, skipna=True))
                return centre / spread, centre * spread
            spread = da.std(seeds, skipna=True)
            return centre - spread, centre + spread


@contextmanager
def _all_nan_quiet():
    """Statistics of a value no learner has (an empty corner of the grid) are NaN, without numpy's warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"All-NaN slice|Mean of empty slice|Degrees of freedom", RuntimeWarning)
        yield


def colours(ds: xr.Dataset) -> dict[tuple[str, object], str]:
    """One colour per (dimension, value) of the whole result, by the value's place among the dimension's values:
    matplotlib's colour cycle up to 10 values, tab20 up to 20, viridis beyond.

    >>> ds = xr.Dataset(coords={"lr": [0.01, 0.1]})
    >>> colours(ds)[("lr", 0.1)]
    '#ff7f0e'
    """
    table: dict[tuple[str, object], str] = {}
    for dim in ds.dims:
        if dim == "step":
            continue
        values = ds[dim].values.tolist()
        for value, colour in zip(values, _palette(len(values)), strict=True):
            try:
                table[(str(dim), value)] = colour
            except TypeError:  # an unhashable value: left to matplotlib's cycle
                continue
    return table


def _palette(n: int) -> list[str]:
    cycle = [to_hex(c) for c in plt.rcParams["axes.prop_cycle"].by_key().get("color", [])]
    if n <= len(cycle):
        return cycle[:n]
    if n <= 20:
        return [to_hex(c) for c in plt.get_cmap("tab20").colors[:n]]
    return [to_hex(plt.get_cmap("viridis")(i / (n - 1))) for i in range(n)]


def pretty(metric: str) -> str:
    return PRETTY.get(metric, metric.replace("_", " "))


def seed_dims(da: xr.DataArray) -> list[str]:
    """Dimensions that number seeds: every dimension whose name ends in ``seed``."""
    return [d for d in da.dims if str(d).endswith("seed")]


class Plotter:
    def __init__(self, ds: xr.Dataset):
        self.ds = ds
        self.colours = colours(ds)  # (dimension, value) -> colour, the same in every plot drawn from ds

    # -- what to draw ---------------------------------------------------------------------------------------

    def metrics(self) -> list[str]:
        """Metrics with a step dimension that hold at least one number."""
        return [str(m) for m, v in self.ds.data_vars.items() if "step" in v.dims and bool(v.notnull().any())]

    def _data(self, metric: str, sel: Mapping | None) -> xr.DataArray:
        if metric not in self.ds.data_vars:
            raise ValueError(f"The result has no metric {metric!r}; it has: {', '.join(map(str, self.ds.data_vars))}.")
        da = self.ds[metric]
        for name, value in (sel or {}).items():
            if name not in da.coords:
                raise ValueError(f"sel: {metric} has no coordinate {name!r}; it has: {', '.join(map(str, da.coords))}.")
            values = np.atleast_1d(da[name].values).tolist()
            match = [v for v in values if selects(v, value)]  # a label or the value it labels
            if not match:
                raise ValueError(f"sel: {name}={value!r} is not a value of {name}; its values: {values}.")
            value = match[0]
            da = da.sel({name: value}) if name in da.dims else da
        single = [d for d in da.dims if d != "step" and da.sizes[d] == 1]
        return da.squeeze(single)

    @staticmethod
    def _arrange(da: xr.DataArray, metric: str, slots: dict[str, str | None],
                 fixed: Sequence[str] = ("step",)) -> tuple[dict[str, str | None], list[str]]:
        """Place every dimension of ``da``: the ``fixed`` ones, one per slot (lines, panels...: as given, else
        the next free dimension, in order), and the seeds, which are averaged. A dimension left over is refused,
        never averaged. Returns the slots and the seed dimensions."""
        for slot, dim in slots.items():
            if dim is not None and dim not in da.dims:
                raise ValueError(f"{slot}={dim!r} is not a dimension of {metric}; its dimensions: "
                                 f"{', '.join(map(str, da.dims))} (a dimension of one value is selected, not drawn).")
        chosen = set(slots.values()) - {None}
        seeds = [d for d in seed_dims(da) if d not in chosen]
        free = [str(d) for d in da.dims if d not in fixed and d not in seeds and d not in chosen]
        slots = {slot: dim or (free.pop(0) if free else None) for slot, dim in slots.items()}
        if free:
            example = ", ".join(f"{d!r}: {da[d].values.tolist()[0]!r}" for d in free)
            shown = ", ".join(f"{slot}={dim}" for slot, dim in slots.items() if dim)
            raise ValueError(
                f"{metric} has more dimensions than this plot can show without averaging them: {', '.join(free)} "
                f"besides {shown} and the seeds. Select them, e.g. sel={{{example}}}, or choose "
                f"{', '.join(slots)}.")
        return slots, seeds

    # -- plots ------------------------------------------------------------------------------------------------

    def curves(self, metric: str = "test_acc", hue: str | None = None, col: str | None = None, row: str | None = None,
               sel: Mapping | None = None, stat: str = "mean", band: str | tuple[float, float] | None = "std",
               seeds: bool = False, yscale: str = "linear") -> Figure:
        """``metric`` against step: a line per value of ``hue`` (default: the first dimension that is not a
        seed), the ``stat`` over the seed dimensions (``mean``, ``median``, ``geomean``) with a ``band`` (``std``:
        +- one std, multiplicative for ``geomean``; ``quantiles``: 25-75%, or ``(low, high)``; None), each learner
        as a thin line too with ``seeds=True``; other dimensions are panels (``col``, ``row``) or selected with
        ``sel``. ``yscale="log"`` keeps the step axis linear: exponential growth is a straight line."""
        summary = Summary.of(stat, band)
        _check_scale("yscale", yscale)
        da = self._data(metric, sel)
        summary.check(da, metric)
        slots, seed_list = self._arrange(da, metric, {"hue": hue, "col": col, "row": row})
        fig = _lines(da, **slots, seeds=seed_list, label=pretty(metric), summary=summary, colours=self.colours,
                     each_seed=seeds, yscale=yscale)
        what = pretty(metric) + (", log scale" if yscale == "log" else "")
        _suptitle(fig, _title(self.ds, what, seed_list, sel, _seeds_note(seeds, seed_list),
                              spread=f"{summary.describe()} over"))
        return _finish(fig)

    def scaling(self, metric: str = "control_distance", hue: str | None = None, col: str | None = None,
                row: str | None = None, sel: Mapping | None = None, stat: str = "mean",
                band: str | tuple[float, float] | None = "std", seeds: bool = False, yscale: str = "log",
                xscale: str = "log") -> Figure:
        """How a distance grows: ``metric`` (default the distance to the control) against step on log-log
        axes, a line per value of ``hue`` (default ``epsilon`` if present), a panel per window (``when`` or
        ``at`` if present), ``stat`` and ``band`` over seeds as in ``curves``. Controls are left out (their
        distance is 0), and so are values <= 0 (no change yet) and, on a log step axis, step 0.
        ``xscale="linear"``: log distance against linear steps, where exponential growth is a straight line."""
        summary = Summary.of(stat, band)
        _check_scale("yscale", yscale)
        _check_scale("xscale", xscale)
        da = self._data(metric, sel)
        if "control" in da.coords and metric.startswith("control_"):
            da = da.where(~da["control"])  # the coordinate as selected with the data
        if xscale == "log":
            da = da.sel(step=da["step"] > 0)
        if hue is None and "epsilon" in da.dims:
            hue = "epsilon"
        if col is None:
            col = next((d for d in WINDOW_DIMS if d in da.dims and d != hue), None)
        da = da.where(da > 0)  # a zero distance (no change yet) has no place on a log axis
        slots, seed_list = self._arrange(da, metric, {"hue": hue, "col": col, "row": row})
        fig = _lines(da, **slots, seeds=seed_list, label=pretty(metric), summary=summary, colours=self.colours,
                     each_seed=seeds, yscale=yscale)
        for ax in fig.axes:
            if ax.get_lines() and xscale == "log":
                _log_x(ax, da["step"].values)
        scales = {("log", "log"): "log-log", ("linear", "log"): "log scale", ("log", "linear"): "log steps"}
        what = ", ".join([pretty(metric)] + [scales[(xscale, yscale)]] * ((xscale, yscale) in scales))
        notes = ["controls left out"] * metric.startswith("control_") + [_seeds_note(seeds, seed_list)]
        _suptitle(fig, _title(self.ds, what, seed_list, sel, "; ".join(n for n in notes if n),
                              spread=f"{summary.describe()} over"))
        return _finish(fig)

    def heatmap(self, metric: str = "test_acc", x: str | None = None, y: str | None = None, step: int = -1,
                col: str | None = None, row: str | None = None, sel: Mapping | None = None,
                stat: str = "mean") -> Figure:
        """The ``stat`` (``mean``, ``median``, ``geomean``) over seeds of ``metric`` at ``step`` (a logged step; -1:
        the last) over coordinates ``x`` and ``y`` (default: the first two that are not seeds), each cell labelled
        with its value (up to 100 cells). ``x`` or ``y`` may be ``"step"``: the metric over all logged steps."""
        summary = Summary.of(stat, None)
        da = self._data(metric, sel)
        steps = da["step"].values.tolist()
        if step != -1 and step not in steps:
            raise ValueError(f"step={step} was not logged; the logged steps are {steps}.")
        at = steps[-1] if step == -1 else step
        over_steps = "step" in (x, y)
        if not over_steps:
            da = da.sel(step=at)
        slots, seeds = self._arrange(da, metric, {"x": x, "y": y, "col": col, "row": row}, fixed=())
        if slots["y"] is None:
            raise ValueError(f"A heat map needs two dimensions besides the seeds; {metric} has {', '.join(map(str, da.dims))}.")
        summary.check(da, metric)
        fig = _heatmap(summary.centre(da, seeds), **slots, label=pretty(metric))
        when = "over steps" if over_steps else f"at step {at}"
        _suptitle(fig, _title(self.ds, f"{pretty(metric)} {when}", seeds, sel, spread=f"{summary.describe()} over"))
        return _finish(fig)

    # -- files ------------------------------------------------------------------------------------------------

    def save(self, path: str | Path, metric: str = "test_acc", hue: str | None = None) -> Path:
        """Draw ``curves`` into a PNG file."""
        return save_figure(self.curves(metric, hue), path)

    def save_all(self, folder: str | Path) -> list[Path]:
        """Every plot worth drawing, as PNGs in ``folder``: ``curves_<metric>.png`` for each metric,
        ``scaling_control_distance.png`` when learners have controls, ``heatmap_<metric>.png`` of the test
        accuracy (else train loss) at the last step when two coordinates vary; a metric with a dimension of its
        own of more than 12 values (a custom metric per unit) is a heat map over it and the steps. A dimension
        beyond what a plot shows (lines, columns, rows) gets one file per value (``curves_<metric>_<dim>=<value>.png``)."""
        return [path for paths in self.save_each(folder).values() for path in paths]

    def save_each(self, folder: str | Path) -> dict[str, list[Path]]:
        """What ``save_all`` writes, by plot: ``{"curves_test_acc": [path], "scaling_control_distance": [...]}``
        (a plot with one file per value of a dimension beyond what it shows lists them all)."""
        folder = Path(folder)
        plots: dict[str, list[Path]] = {}
        grid_dims = set(self.ds["learner"].dims) if "learner" in self.ds.coords else set()
        for metric in self.metrics():
            dims = self._non_seed_dims(metric)
            big = [d for d in dims if d not in grid_dims and self.ds.sizes[d] > MAX_FACETS]
            if big:  # a metric's own dimension with many values (units...): a heat map over it and the steps
                others = [d for d in dims if d != big[0]]
                plots[f"heatmap_{metric}"] = self._save_each(
                    folder, f"heatmap_{metric}", metric, others[2:],
                    lambda sel, m=metric, d=big[0]: self.heatmap(m, x=d, y="step", sel=sel))
                continue
            plots[f"curves_{metric}"] = self._save_each(folder, f"curves_{metric}", metric, dims[3:],
                                                        lambda sel, m=metric: self.curves(m, sel=sel))
        if "control_distance" in self.metrics():
            dims = self._non_seed_dims("control_distance")
            first = [d for d in ("epsilon", *WINDOW_DIMS) if d in dims]
            beyond = [d for d in dims if d not in first][3 - len(first):]
            plots["scaling_control_distance"] = self._save_each(
                folder, "scaling_control_distance", "control_distance", beyond,
                lambda sel: self.scaling("control_distance", sel=sel))
        summary = self.main_metric()
        if summary and len(self._non_seed_dims(summary)) >= 2:
            plots[f"heatmap_{summary}"] = self._save_each(folder, f"heatmap_{summary}", summary,
                                                          self._non_seed_dims(summary)[4:],
                                                          lambda sel: self.heatmap(summary, sel=sel))
        return {name: paths for name, paths in plots.items() if paths}

    def main_metric(self) -> str | None:
        """The metric a run is read by: the test accuracy, else the train loss (None if neither has a number)."""
        return next((m for m in MAIN_METRICS if m in self.metrics()), None)

    def headline(self) -> list[str]:
        """The plots of ``save_each`` that ``Experiment.run(plot=True)`` shows in Jupyter: the curves of the main
        metric, and how the distance to the control grows when learners have controls."""
        main, metrics = self.main_metric(), self.metrics()
        return [f"curves_{main}"] * (main is not None) + ["scaling_control_distance"] * ("control_distance" in metrics)

    def _non_seed_dims(self, metric: str) -> list[str]:
        da = self.ds[metric]
        return [str(d) for d in da.dims if d != "step" and da.sizes[d] > 1 and d not in seed_dims(da)]

    def _save_each(self, folder: Path, stem: str, metric: str, beyond: list[str], draw) -> list[Path]:
        """Save ``draw(sel)`` once per combination of values of the ``beyond`` dimensions (those with data)."""
        paths = []
        for values in itertools.product(*(self.ds[d].values.tolist() for d in beyond)):
            sel = dict(zip(beyond, values, strict=True))
            try:
                fig = draw(sel)
            except NothingToDraw:
                continue  # an empty corner of the grid
            name = stem + "".join(f"_{d}={_slug(v)}" for d, v in sel.items())
            paths.append(save_figure(fig, folder / f"{name}.png"))
        return paths


# -- drawing with xarray ---------------------------------------------------------------------------------------

def _lines(da: xr.DataArray, hue: str | None, col: str | None, row: str | None, seeds: list[str], label: str,
           summary: Summary, colours: Mapping[tuple[str, object], str], each_seed: bool, yscale: str) -> Figure:
    """The ``summary`` statistic over ``seeds`` against step with its band, a line per ``hue`` in the value's
    colour (``colours``), panels by ``col``/``row``; each learner a thin line too when ``each_seed``."""
    if not bool(da.notnull().any()):
        raise NothingToDraw(f"nothing to draw: {label} holds no number here")
    for dim in (hue, col, row):  # values without any number would only add empty lines or panels
        if dim is not None:
            da = da.sel({dim: da.notnull().any([d for d in da.dims if d != dim])})
    centre = summary.centre(da, seeds).rename(label)
    edges = summary.edges(da, seeds, centre)
    count = da.notnull().any("step").sum(seeds) if seeds else xr.ones_like(da.isel(step=0), dtype=int)
    palette: list[str | None] = [None]
    if hue is not None:
        values = da[hue].values.tolist()
        palette = [_colour(colours, hue, v) for v in values]
        labels = [_with_count(v, count.sel({hue: v})) for v in values]
        centre, da = (a.assign_coords({hue: labels}) for a in (centre, da))
        edges = None if edges is None else tuple(e.assign_coords({hue: labels}) for e in edges)
    if col or row:
        wrap = 4 if col and not row and centre.sizes[col] > 4 else None
        grid = xr.plot.FacetGrid(centre, col=col, row=row, col_wrap=wrap, sharey=True, size=3, aspect=1.3)
        fig, panels = grid.fig, [(ax, sel) for ax, sel in zip(grid.axs.flat, grid.name_dicts.flat, strict=True) if sel]
        for ax, sel in zip(grid.axs.flat, grid.name_dicts.flat, strict=True):
            ax.set_visible(sel is not None)  # the places a wrapped grid leaves over
        grid.set_titles()
    else:
        fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
        panels = [(ax, {})]
    drawn: dict[object, list] = {}  # panel -> its lines of the statistic, one per hue value (seeds' lines aside)
    for ax, sel in panels:
        part = centre.sel(sel)
        if not bool(part.notnull().any()):
            ax.text(0.5, 0.5, "no learners here", ha="center", va="center", transform=ax.transAxes, color="gray")
            continue
        drawn[ax] = part.plot.line(x="step", hue=hue, ax=ax, add_legend=False, _labels=False)
        names = [None] if hue is None else part[hue].values.tolist()
        for line, name, colour in zip(drawn[ax], names, palette, strict=True):
            one = {} if name is None else {hue: name}
            colour = colour or line.get_color()
            line.set_color(colour)
            line.set_label(str(name))
            line.set_marker("o")  # a value logged once (or between gaps) still shows
            line.set_markersize(3)
            if edges is not None:
                low, high = (e.sel(sel).sel(one) for e in edges)
                ax.fill_between(low["step"].values, low.values, high.values, color=colour, alpha=0.2, linewidth=0)
            if each_seed and seeds:
                _seed_lines(ax, da.sel(sel).sel(one), seeds, colour)
        ax.grid(alpha=0.3)
    for ax in drawn if yscale == "log" else ():
        ax.set_yscale("log")
    for ax in drawn if yscale == "log" else ():  # ticks once every panel's limits are known (shared axes)
        _log_y_ticks(ax)
    for ax, _ in panels:
        ax.set_title(ax.get_title() if (col or row) else "")
        if ax.get_subplotspec().is_last_row() or not (col or row):
            ax.set_xlabel(STEP_LABEL)
        if ax.get_subplotspec().is_first_col() or not (col or row):
            ax.set_ylabel(label)
    if hue is not None:
        handles = next((lines for lines in drawn.values() if len(lines) == centre.sizes[hue]), [])
        names = [ln.get_label() for ln in handles]
        if col or row:
            fig.legend(handles, names, title=hue, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
        else:
            panels[0][0].legend(handles, names, title=hue, fontsize="small")
    return fig


def _seed_lines(ax, da: xr.DataArray, seeds: list[str], colour: str) -> None:
    """Each learner of ``da`` (dims: ``seeds`` and step) as a thin line below the statistic (gid ``seed``, out of
    the legend); a learner without any number here draws nothing."""
    each = da.stack(learner_=seeds).transpose("learner_", "step")  # (learners, steps)
    for values in each.values:
        if np.isfinite(values).any():
            ax.plot(each["step"].values, values, color=colour, linewidth=0.6, alpha=0.45, zorder=1.5, gid="seed",
                    label="_seed")


def _colour(colours: Mapping[tuple[str, object], str], dim: str, value: object) -> str | None:
    try:
        return colours.get((dim, value))
    except TypeError:  # an unhashable value
        return None


def _seeds_note(each_seed: bool, seeds: list[str]) -> str:
    return "thin lines: each learner" if each_seed and seeds else ""


def _check_scale(name: str, scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"{name}={scale!r}: use 'linear' or 'log'.")


def _log_x(ax, steps: np.ndarray) -> None:
    """A log step axis labelled with plain numbers: 1, 2, 5, 10, 20... or, where fewer than three of those fall
    in the steps' range, the logged steps themselves."""
    ax.set_xscale("log")
    lo, hi = float(steps.min()), float(steps.max())
    rounds = [m * 10**d for d in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1) for m in (1, 2, 5)]
    ticks = [v for v in rounds if lo <= v <= hi]
    if len(ticks) < 3:
        ticks = sorted({int(s) for s in steps})
        ticks = ticks[:: -(-len(ticks) // 6)]
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())


def _log_y_ticks(ax) -> None:
    """A log value axis labelled with plain numbers, 1, 2, 5, 10... (powers of 10 alone over more than three
    decades). Values <= 0 have no place on it: a band's edge there runs off the bottom of the axis."""
    low, high = ax.get_ylim()
    subs = (1.0, 2.0, 5.0) if np.log10(high / low) <= 3 else (1.0,)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _with_count(value: object, count: xr.DataArray) -> str:
    counts = np.unique(count.values[count.values > 0])
    n = "0" if len(counts) == 0 else str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{value} (n={n})"


def _heatmap(mean: xr.DataArray, x: str, y: str, col: str | None, row: str | None, label: str) -> Figure:
    """Cells by position (coordinates may be uneven or strings), ticks labelled with the values."""
    xs, ys = mean[x].values.tolist(), mean[y].values.tolist()
    grid_ = mean.assign_coords({x: np.arange(len(xs)), y: np.arange(len(ys))})
    panels = {k: v for k, v in (("col", col), ("row", row)) if v}
    out = grid_.plot.imshow(x=x, y=y, cmap="viridis", cbar_kwargs={"label": label}, **panels,
                            **({"size": 3.2, "aspect": 1.2} if panels else {}))
    if panels:
        fig, axes = out.fig, [(ax, sel) for ax, sel in zip(out.axs.flat, out.name_dicts.flat, strict=True) if sel]
    else:
        fig, axes = out.figure, [(out.axes, {})]
        out.axes.set_title("")
        fig.set_size_inches(min(12, max(5, 1.1 * len(xs) + 2.5)), min(8, max(3.5, 0.6 * len(ys) + 2)))
    finite = mean.values[np.isfinite(mean.values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for ax, sel in axes:
        values = grid_.sel(sel).transpose(y, x).values
        if values.size <= MAX_LABELLED_CELLS:
            for (i, j), v in np.ndenumerate(values):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=8,
                            color="black" if v > middle else "white")
        for axis, labels in ((ax.xaxis, xs), (ax.yaxis, ys)):
            every = -(-len(labels) // MAX_TICKS)  # at most MAX_TICKS labels
            axis.set_ticks(range(0, len(labels), every), [str(v) for v in labels[::every]])
        spec = ax.get_subplotspec()
        ax.set_xlabel(x if spec.is_last_row() else "")
        ax.set_ylabel(y if spec.is_first_col() else "")
    return fig


def _title(ds: xr.Dataset, what: str, seeds: list[str], sel: Mapping | None, note: str = "",
           spread: str = "mean ± 1 std over") -> str:
    name = ds.attrs.get("experiment")
    chosen = ", ".join(f"{k}={v}" for k, v in (sel or {}).items())
    spread = f"{spread} {', '.join(seeds)}" if seeds else "one learner each (no seed dimension)"
    diverged = int(ds["diverged_at"].notnull().sum()) if "diverged_at" in ds else 0
    if diverged:
        note = "; ".join(p for p in (note, f"{diverged} learner(s) diverged: left out from then on") if p)
    parts = [p for p in (chosen, spread, note) if p]
    return (f"{name}: " if name else "") + what + "\n" + "; ".join(parts)


def _suptitle(fig: Figure, text: str) -> None:
    """A title above everything: layout engines make room for it; on facet grids (no engine) it goes above
    the top edge, which tight saving and Jupyter's display include."""
    if isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine):
        fig.suptitle(text)
        return
    renderer = fig.canvas.get_renderer()
    top = max(ax.get_tightbbox(renderer).y1 for ax in fig.axes if ax.get_visible()) / fig.bbox.height
    fig.suptitle(text, y=top + 0.01, va="bottom")


def _finish(fig: Figure) -> Figure:
    """Every figure passes here: it leaves pyplot (so that notebooks show it once, and figures do not pile
    up) and is returned to the caller."""
    plt.close(fig)
    return fig


def _slug(value: object) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(value)).strip("_") or "none"


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path

