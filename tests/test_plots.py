"""Plots that cannot mislead: only seeds are averaged, every other dimension is a line, a panel or selected;
what each plot draws is the data; the PNGs that run(plot=True) writes are readable."""

import base64

import numpy as np
import pytest
import xarray as xr

from serimats_func import jupyter
from serimats_func import plotter as plotting
from serimats_func.interventions import PerturbWeights
from serimats_func.plotter import Plotter
from tests.readable import assert_png_not_blank, assert_readable


def grid_result(seed=3, optimizer=("SGD", "Adam"), lr=(0.001, 0.01, 0.1), steps=(0, 10, 20, 30)) -> xr.Dataset:
    values = np.random.default_rng(0).random((seed, len(optimizer), len(lr), len(steps)))
    return xr.Dataset({"test_acc": (("seed", "optimizer", "lr", "step"), values)},
                      coords={"seed": range(seed), "optimizer": list(optimizer), "lr": list(lr), "step": list(steps)},
                      attrs={"experiment": "demo"})


def test_curves_average_only_the_seeds_and_make_panels_of_other_dimensions():
    ds = grid_result()
    fig = Plotter(ds).curves("test_acc", hue="lr")
    assert_readable(fig)
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert [ax.get_title() for ax in panels] == ["optimizer = SGD", "optimizer = Adam"]
    mean, std = ds.test_acc.mean("seed"), ds.test_acc.std("seed")
    for ax, optimizer in zip(panels, ["SGD", "Adam"], strict=True):
        for line, lr in zip(ax.get_lines(), ds.lr.values, strict=True):
            np.testing.assert_allclose(line.get_ydata(), mean.sel(optimizer=optimizer, lr=lr))
        band = ax.collections[0].get_paths()[0].vertices[:, 1]  # the first lr's band
        first = mean.sel(optimizer=optimizer, lr=0.001)
        sd = std.sel(optimizer=optimizer, lr=0.001)
        assert band.max() == pytest.approx(float((first + sd).max())) and band.min() == pytest.approx(float((first - sd).min()))
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["0.001 (n=3)", "0.01 (n=3)", "0.1 (n=3)"]
    assert "mean ± 1 std over seed" in fig._suptitle.get_text()


def test_a_dimension_that_is_neither_line_nor_panel_nor_seed_is_refused_not_averaged():
    ds = grid_result().expand_dims(width=[8, 16]).transpose("seed", "width", "optimizer", "lr", "step")
    with pytest.raises(ValueError, match=r"more dimensions than this plot can show without averaging them: lr .* "
                                         r"Select them, e\.g\. sel=\{'lr': 0\.001\}"):
        Plotter(ds).curves("test_acc", hue="width", col="optimizer", row="seed")
    fig = Plotter(ds).curves("test_acc", hue="lr", col="optimizer", sel={"width": 16})
    assert "width=16" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match=r"sel: width=32 is not a value of width; its values: \[8, 16\]"):
        Plotter(ds).curves("test_acc", sel={"width": 32})


def scaling_result() -> xr.Dataset:
    steps = np.array([0, 1, 10, 100])
    eps = np.array([0.0, 0.01, 0.1])
    distance = eps[:, None, None, None] * (1 + steps)[None, None, None, :] * np.ones((3, 2, 2, 4))  # (eps, seed, when, step)
    control = np.zeros((3, 2, 2), dtype=bool)
    control[0, 0, 0] = True
    distance[0] = np.nan
    distance[0, 0, 0] = 0.0
    return xr.Dataset({"control_distance": (("epsilon", "seed", "when", "step"), distance)},
                      coords={"epsilon": eps, "seed": [0, 1], "when": ["0-10", "50-60"], "step": steps,
                              "control": (("epsilon", "seed", "when"), control)})


def test_scaling_plot_is_log_log_with_a_line_per_epsilon_a_panel_per_window_and_no_controls():
    fig = Plotter(scaling_result()).scaling()
    assert_readable(fig)
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert [ax.get_title() for ax in panels] == ["when = 0-10", "when = 50-60"]
    assert all(ax.get_xscale() == "log" and ax.get_yscale() == "log" for ax in panels)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["0.01 (n=2)", "0.1 (n=2)"]  # the control left out
    line = panels[0].get_lines()[1]
    np.testing.assert_allclose(line.get_xdata(), [1, 10, 100])  # step 0 has no place on a log axis
    np.testing.assert_allclose(line.get_ydata(), [0.2, 1.1, 10.1])
    one = Plotter(scaling_result()).scaling(sel={"when": "50-60"})  # a selected window: one panel, the same lines
    assert len([ax for ax in one.axes if ax.get_lines()]) == 1 and "when=50-60" in one._suptitle.get_text()
    np.testing.assert_allclose(one.axes[0].get_lines()[1].get_ydata(), [0.2, 1.1, 10.1])


def test_heatmap_cells_hold_the_mean_over_seeds_at_the_chosen_step():
    ds = grid_result()
    fig = Plotter(ds).heatmap("test_acc", x="lr", y="optimizer", step=20)
    assert_readable(fig)
    ax = fig.axes[0]
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in ax.texts}
    mean = ds.test_acc.sel(step=20).mean("seed")
    for j, lr in enumerate(ds.lr.values):
        for i, optimizer in enumerate(ds.optimizer.values):
            assert texts[(j, i)] == f"{float(mean.sel(lr=lr, optimizer=optimizer)):.3g}"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.001", "0.01", "0.1"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("lr", "optimizer")
    assert "at step 20" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match=r"step=5 was not logged; the logged steps are \[0, 10, 20, 30\]"):
        Plotter(ds).heatmap("test_acc", step=5)


def test_run_with_plot_writes_readable_pngs_next_to_the_store_and_prints_nothing_outside_jupyter(experiment, monkeypatch,
                                                                                                 capsys):
    drawn, shown = [], []
    real_save = plotting.save_figure

    def checked(fig, path):
        assert_readable(fig)
        drawn.append(path)
        return real_save(fig, path)

    monkeypatch.setattr(plotting, "save_figure", checked)
    monkeypatch.setattr(jupyter, "_display", lambda *a, **k: shown.append(a))
    exp = experiment([PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
                      PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=(1, 2))], steps=8, log_every=2)
    exp.run(plot=True)
    names = sorted(p.name for p in exp.plots_folder.iterdir())
    assert exp.plots_folder == exp.store.path.parent / f"{exp.store.path.stem}_plots"
    assert {"curves_test_acc.png", "curves_control_distance.png", "curves_control_layer_distance.png",
            "scaling_control_distance.png"} <= set(names)
    assert sorted(p.name for p in drawn) == names
    assert shown == [] and capsys.readouterr().out == ""  # outside Jupyter: the files only, as before
    for path in drawn:
        assert_png_not_blank(path)


def test_run_with_plot_in_jupyter_shows_the_main_metric_and_the_distance_growth_and_names_the_rest(experiment, monkeypatch,
                                                                                                  capsys):
    shown = []
    monkeypatch.setattr(jupyter, "in_jupyter", lambda: True)  # what a Jupyter kernel answers
    monkeypatch.setattr(jupyter, "_display", lambda data, raw: shown.append(base64.b64decode(data["image/png"])))
    exp = experiment([PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
                      PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=(1, 2))], steps=8, log_every=2)
    exp.run(plot=True)
    written = sorted(exp.plots_folder.iterdir())
    assert len(written) > 10  # every metric's curves, the scaling plot, the heat map
    headline = [exp.plots_folder / "curves_test_acc.png", exp.plots_folder / "scaling_control_distance.png"]
    assert shown == [p.read_bytes() for p in headline]  # the two figures inline, in that order, as written
    rest = sorted(p.name for p in written if p not in headline)
    out = capsys.readouterr().out
    assert out == f"{len(rest)} more plots in {exp.plots_folder}/: " + ", ".join(sorted(rest, key=out.index)) + "\n"


def test_the_plots_shown_inline_are_the_main_metric_then_the_distance_growth():
    ds = grid_result()
    assert Plotter(ds).headline() == ["curves_test_acc"]
    assert Plotter(ds.rename(test_acc="train_loss")).headline() == ["curves_train_loss"]  # no test set
    ds["control_distance"] = ds.test_acc.copy()
    ds["test_acc"][:] = np.nan  # a metric without a number is not drawn
    assert Plotter(ds).headline() == ["scaling_control_distance"]


def test_a_plot_says_how_many_learners_diverged_and_left_the_mean():
    ds = grid_result()
    diverged = np.full((3, 2, 3), np.nan)
    diverged[0, 0, 0] = 20.0
    ds["diverged_at"] = (("seed", "optimizer", "lr"), diverged)
    ds["test_acc"][0, 0, 0, 2:] = np.nan  # NaN from its divergence on, as the library records it
    fig = Plotter(ds).curves("test_acc", hue="lr")
    assert "1 learner(s) diverged: left out from then on" in fig._suptitle.get_text()
    line = [ax for ax in fig.axes if ax.get_lines()][0].get_lines()[0]  # SGD, lr 0.001
    np.testing.assert_allclose(line.get_ydata()[2:], ds.test_acc[1:, 0, 0, 2:].mean("seed"))


# -- heavy tails: median, geometric mean, quantile bands, each seed, log values ----------------------------------

def heavy_result(seeds=5, lr=(0.001, 0.01, 0.1), steps=(0, 10, 20, 30)) -> xr.Dataset:
    """Log-normal values (a heavy tail over seeds) on (seed, init_seed, optimizer, lr, step)."""
    values = np.exp(3 * np.random.default_rng(1).standard_normal((seeds, 2, 2, len(lr), len(steps))))
    return xr.Dataset({"train_loss": (("seed", "init_seed", "optimizer", "lr", "step"), values)},
                      coords={"seed": range(seeds), "init_seed": [0, 1], "optimizer": ["SGD", "Adam"], "lr": list(lr),
                              "step": list(steps)}, attrs={"experiment": "tails"})


def main_lines(ax) -> list:
    return [ln for ln in ax.get_lines() if ln.get_gid() != "seed"]


def seed_lines(ax) -> list:
    return [ln for ln in ax.get_lines() if ln.get_gid() == "seed"]


def band_edges(collection) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The steps of a fill_between band and its lower and upper edge at each."""
    vertices = np.concatenate([p.vertices for p in collection.get_paths()])
    steps = np.unique(vertices[:, 0])
    return (steps, np.array([vertices[vertices[:, 0] == s, 1].min() for s in steps]),
            np.array([vertices[vertices[:, 0] == s, 1].max() for s in steps]))


def test_median_with_a_quantile_band_and_each_learner_as_a_thin_line_of_its_value_s_colour():
    ds = heavy_result()
    values = ds.train_loss.transpose("optimizer", "lr", "step", "seed", "init_seed").values  # seeds last
    learners = values.reshape(*values.shape[:3], -1)  # (optimizer, lr, step, 10 learners)
    for band, (lo, hi) in (("quantiles", (0.25, 0.75)), ((0.1, 0.9), (0.1, 0.9))):
        fig = Plotter(ds).curves("train_loss", hue="lr", col="optimizer", stat="median", band=band, seeds=True)
        assert_readable(fig)
        panels = [ax for ax in fig.axes if ax.get_lines()]
        for o, ax in enumerate(panels):
            assert len(main_lines(ax)) == 3 and len(seed_lines(ax)) == 3 * 10  # 5 seeds x 2 init seeds per lr
            for i, (line, collection) in enumerate(zip(main_lines(ax), ax.collections, strict=True)):
                np.testing.assert_allclose(line.get_ydata(), np.median(learners[o, i], axis=-1), rtol=1e-12)
                steps, low, high = band_edges(collection)
                np.testing.assert_allclose(steps, ds.step)
                np.testing.assert_allclose(low, np.quantile(learners[o, i], lo, axis=-1), rtol=1e-12)
                np.testing.assert_allclose(high, np.quantile(learners[o, i], hi, axis=-1), rtol=1e-12)
                thin = seed_lines(ax)[10 * i:10 * (i + 1)]  # drawn after their line, learner by learner
                assert {ln.get_color() for ln in thin} == {line.get_color()}
                assert all(ln.get_linewidth() < line.get_linewidth() for ln in thin)
                np.testing.assert_allclose(np.array([ln.get_ydata() for ln in thin]), learners[o, i].T, rtol=1e-12)
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["0.001 (n=10)", "0.01 (n=10)", "0.1 (n=10)"]
        title = fig._suptitle.get_text()
        assert f"median, {100 * lo:g}-{100 * hi:g}% quantiles over seed, init_seed" in title
        assert "thin lines: each learner" in title


def test_geometric_mean_has_a_multiplicative_band_skips_diverged_learners_and_refuses_values_not_positive():
    ds = heavy_result()
    ds["train_loss"][0, 0, 0, 0, 2:] = np.nan  # a diverged learner: NaN from then on
    fig = Plotter(ds).curves("train_loss", hue="lr", sel={"optimizer": "SGD", "init_seed": 1}, stat="geomean")
    logs = np.log(ds.train_loss.sel(optimizer="SGD", init_seed=1).transpose("lr", "step", "seed").values)
    ax = fig.axes[0]
    for i, (line, collection) in enumerate(zip(main_lines(ax), ax.collections, strict=True)):
        g, s = np.exp(np.nanmean(logs[i], axis=-1)), np.exp(np.nanstd(logs[i], axis=-1))
        np.testing.assert_allclose(line.get_ydata(), g, rtol=1e-12)
        _, low, high = band_edges(collection)
        np.testing.assert_allclose(low, g / s, rtol=1e-12)
        np.testing.assert_allclose(high, g * s, rtol=1e-12)
    assert "geometric mean ×/÷ 1 geometric std over seed" in fig._suptitle.get_text()
    ds["train_loss"][1, 0, 0, 0, 1] = 0.0
    ds["train_loss"][2, 0, 0, 0, 1] = -2.0
    with pytest.raises(ValueError, match=r"stat='geomean' needs positive values: train_loss has 2 value\(s\) <= 0 "
                                         r"here \(the least -2\)\. Use stat='median'"):
        Plotter(ds).curves("train_loss", hue="lr", col="optimizer", row="init_seed", stat="geomean")
    with pytest.raises(ValueError, match="stat='geomean' needs positive values"):
        Plotter(ds).heatmap("train_loss", x="lr", y="optimizer", sel={"init_seed": 0}, step=10, stat="geomean")


def test_no_band_draws_the_statistic_alone_and_the_heat_map_takes_the_same_statistic():
    ds = heavy_result()
    fig = Plotter(ds).curves("train_loss", hue="lr", col="optimizer", sel={"init_seed": 0}, stat="median", band=None)
    panels = [ax for ax in fig.axes if ax.get_lines()]
    assert all(not ax.collections and not seed_lines(ax) for ax in panels)
    np.testing.assert_allclose(panels[1].get_lines()[2].get_ydata(),
                               np.median(ds.train_loss.sel(init_seed=0, optimizer="Adam", lr=0.1).values, axis=0))
    assert "median over seed" in fig._suptitle.get_text()
    heat = Plotter(ds).heatmap("train_loss", x="lr", y="optimizer", sel={"init_seed": 0}, step=30, stat="median")
    texts = {(round(t.get_position()[0]), round(t.get_position()[1])): t.get_text() for t in heat.axes[0].texts}
    expected = float(np.median(ds.train_loss.sel(init_seed=0, optimizer="Adam", lr=0.01, step=30).values))
    assert texts[(1, 1)] == f"{expected:.3g}" and "median over seed" in heat._suptitle.get_text()


def test_log_values_keep_a_linear_step_axis_so_exponential_growth_is_a_straight_line():
    steps = np.arange(0, 50, 10)
    growth = np.exp(0.1 * steps)[None, None, :] * np.array([1.0, 2.0])[:, None, None] * np.ones((2, 3, 1))
    ds = xr.Dataset({"control_distance": (("epsilon", "seed", "step"), growth)},
                    coords={"epsilon": [0.01, 0.1], "seed": [0, 1, 2], "step": steps})
    ax = Plotter(ds).curves("control_distance", hue="epsilon", yscale="log").axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("linear", "log")
    y = main_lines(ax)[0].get_ydata()
    np.testing.assert_allclose(np.diff(np.log(y)), 1.0)  # a constant slope on these axes
    semi = Plotter(ds).scaling("control_distance", xscale="linear").axes[0]
    assert (semi.get_xscale(), semi.get_yscale()) == ("linear", "log")
    np.testing.assert_allclose(main_lines(semi)[1].get_xdata(), steps)  # step 0 kept on a linear step axis
    log_log = Plotter(ds).scaling("control_distance", seeds=True).axes[0]
    assert (log_log.get_xscale(), log_log.get_yscale()) == ("log", "log") and len(seed_lines(log_log)) == 2 * 3
    default = Plotter(ds).curves("control_distance").axes[0]  # today's default: linear both ways
    assert (default.get_xscale(), default.get_yscale()) == ("linear", "linear")


def line_colours(fig, values: list) -> dict:
    """Each line's value (from its legend label, ``value (n=...)``) and colour, checked the same in every panel."""
    by_label = {str(v): v for v in values}
    seen: dict = {}
    for ax in fig.axes:
        for line in main_lines(ax):
            value = by_label[line.get_label().rsplit(" (n=", 1)[0]]
            assert seen.setdefault(value, line.get_color()) == line.get_color()
    return seen


def test_a_value_has_one_colour_in_every_plot_of_a_result():
    ds = scaling_result()
    ds["test_acc"] = xr.DataArray(np.random.default_rng(2).random((3, 2, 2, 4)), dims=ds.control_distance.dims)
    plotter = Plotter(ds)
    epsilons, windows = ds.epsilon.values.tolist(), ds.when.values.tolist()
    colour = {e: plotter.colours[("epsilon", e)] for e in epsilons}
    assert list(colour.values()) == ["#1f77b4", "#ff7f0e", "#2ca02c"]  # matplotlib's cycle, by place among all values
    curves = line_colours(plotter.curves("test_acc", hue="epsilon", col="when"), epsilons)
    scaling = line_colours(plotter.scaling(), epsilons)  # the control's epsilon (0) left out: the others keep theirs
    assert curves == colour and scaling == {0.01: colour[0.01], 0.1: colour[0.1]}
    no_first = ds.assign(test_acc=ds.test_acc.where(ds.epsilon > 0))  # epsilon 0 without data: not drawn
    later = line_colours(Plotter(no_first).curves("test_acc", hue="epsilon", col="when"), epsilons)
    assert later == {0.01: colour[0.01], 0.1: colour[0.1]}  # still their own colours, not the cycle's first two
    by_window = line_colours(plotter.scaling(hue="when", col="epsilon"), windows)
    assert by_window == line_colours(plotter.curves("test_acc", hue="when", col="epsilon"), windows)
    assert by_window == {w: plotter.colours[("when", w)] for w in windows}
    many = Plotter(ds.assign_coords(epsilon=[0.0, 0.01, 0.1]).reindex(epsilon=np.linspace(0, 0.1, 21)))
    assert len({many.colours[("epsilon", e)] for e in many.ds.epsilon.values.tolist()}) == 21  # past 20: viridis


def test_save_each_draws_every_value_in_its_one_colour(tmp_path, monkeypatch):
    ds = scaling_result().expand_dims(width=[8, 16]).transpose("width", "epsilon", "seed", "when", "step")
    ds["test_acc"] = 0.5 + 0.1 * xr.DataArray(np.random.default_rng(3).random(ds.control_distance.shape),
                                              dims=ds.control_distance.dims)
    plotter = Plotter(ds)
    drawn = []
    monkeypatch.setattr(plotting, "save_figure", lambda fig, path: drawn.append(fig) or path)
    files = plotter.save_each(tmp_path)
    assert {"curves_test_acc", "curves_control_distance", "scaling_control_distance"} <= set(files)
    lines = 0
    for fig in drawn:
        legend = fig.legends[0] if fig.legends else next((ax.get_legend() for ax in fig.axes if ax.get_legend()), None)
        if legend is None:
            continue  # a heat map
        dim = legend.get_title().get_text()
        seen = line_colours(fig, ds[dim].values.tolist())
        assert seen == {v: plotter.colours[(dim, v)] for v in seen}
        lines += len(seen)
    assert lines == 2 + 2 + 2  # both curves by width (the first dimension), the scaling plot by epsilon but 0


def test_bad_statistics_bands_and_scales_are_refused_with_what_to_write():
    plotter = Plotter(heavy_result())
    with pytest.raises(ValueError, match=r"stat='max': use 'mean', 'median' or 'geomean'"):
        plotter.curves("train_loss", stat="max")
    with pytest.raises(ValueError, match=r"band=\(0\.9, 0\.1\): use 'std', 'quantiles' \(25-75%\), a pair of quantiles"):
        plotter.curves("train_loss", band=(0.9, 0.1))
    with pytest.raises(ValueError, match=r"yscale='symlog': use 'linear' or 'log'"):
        plotter.scaling("train_loss", yscale="symlog")
