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
