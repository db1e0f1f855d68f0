"""The demo command and the README's examples run as a new user would run them."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serimats_func.cli import main
from serimats_func.interventions import PerturbWeights
from serimats_func.plotter import save_figure as real_save
from tests import store_paths
from tests.readable import assert_png_not_blank, assert_readable
from tests.watching import CountSteps

ROOT = Path(__file__).resolve().parents[1]


def test_demo_trains_31_learners_writes_store_and_plots_then_reuses_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    figures = checked_figures(monkeypatch)
    assert main(["demo", "--epochs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "31 learners in the grid" in out and "trained 31 learners, 0 reused" in out
    rows = re.findall(r"^\s+(0\.?\d*)\s+(\d+)\s+(0\.\d+) ± (0\.\d+)\s+(\d\.\d+)\s+(\d+\.\d+)$", out, flags=re.M)
    assert [(eps, n) for eps, n, *_ in rows] == [("0", "1"), ("0.001", "10"), ("0.01", "10"), ("0.1", "10")]
    assert all(float(acc) > 0.2 for _, _, acc, *_ in rows)  # one epoch is well above chance (0.1)
    distances = [float(d) for *_, d in rows]
    assert distances[0] == 0 and distances[1] < distances[2] < distances[3]  # ||w - wc|| grows with epsilon
    assert sorted(p.name for p in figures) == ["demo_control_distance.png", "demo_test_acc.png"]
    for png in figures:
        assert_png_not_blank(png)

    assert main(["demo", "--epochs", "1", "--no-progress"]) == 0
    assert "trained 0 learners, 31 reused" in capsys.readouterr().out


def checked_figures(monkeypatch) -> list:
    """Check every figure the command line saves (labelled, titled) and collect the PNG paths."""
    saved = []

    def save(fig, path):
        assert_readable(fig)
        saved.append(real_save(fig, path))
        return saved[-1]

    monkeypatch.setattr("serimats_func.cli.save_figure", save)
    return saved


GRID = [PerturbWeights.make_variations(epsilon=0, seed=0, control=True),
        PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=(1, 2))]


@pytest.fixture
def stored(experiment):
    exp = experiment(GRID, steps=8, log_every=4)
    exp.run()
    return exp


def test_ls_lists_each_learner_with_its_coordinates_and_steps_done(stored, capsys):
    assert main(["ls", str(stored.store.path)]) == 0
    out = capsys.readouterr().out
    assert "5 learners; coordinates: epsilon (3), seed (3)" in out and "control_distance" in out
    for spec in stored.grid.learners:
        line = next(line for line in out.splitlines() if line.startswith(spec.id))
        eps, seed, done, logged, *control = line.split()[1:]
        assert (float(eps), int(seed), done, logged) == (spec.coords["epsilon"], spec.coords["seed"], "8", "3")
        assert control == (["yes"] if spec.control else [])


def test_ls_counts_the_checkpoints_of_an_interrupted_run_and_none_once_it_is_done(experiment, capsys):
    crash = CountSteps(crash_before=8 + 6)  # the first chunk (8 steps) is stored; the second has a checkpoint at 4
    exp = experiment(GRID, steps=8, log_every=4, max_learners_per_chunk=3, checkpoint_every=4, callbacks=[crash])
    with pytest.raises(RuntimeError, match="went down"):
        exp.run()
    assert main(["ls", str(exp.store.path)]) == 0
    out = capsys.readouterr().out
    assert "3 learners" in out and "1 chunk checkpoint(s) of training in progress" in out
    exp.run()
    assert main(["ls", str(exp.store.path)]) == 0
    out = capsys.readouterr().out
    assert "5 learners" in out and "chunk checkpoint(s)" not in out


def test_plot_draws_a_stored_metric_by_a_coordinate_into_a_readable_png(stored, tmp_path, monkeypatch, capsys):
    figures = checked_figures(monkeypatch)
    path = str(stored.store.path)
    assert main(["plot", path, "test_loss", "--by", "epsilon"]) == 0
    assert capsys.readouterr().out.strip() == str(stored.store.path.with_name(f"{stored.store.path.stem}_test_loss.png"))
    assert main(["plot", path, "control_layer_distance", "--by", "layer", "--sel", "epsilon=0.1",
                 "--out", str(tmp_path / "layers.png")]) == 0
    assert main(["plot", path, "control_distance", "--kind", "scaling", "--out", str(tmp_path / "scaling.png")]) == 0
    assert [p.name for p in figures] == [f"{stored.store.path.stem}_test_loss.png", "layers.png", "scaling.png"]
    for png in figures:
        assert_png_not_blank(png)


def test_plot_takes_the_median_a_quantile_band_each_seed_and_a_log_value_axis(stored, tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr("serimats_func.cli.save_figure", lambda fig, path: figures.append(fig) or real_save(fig, path))
    path = str(stored.store.path)
    assert main(["plot", path, "train_loss", "--by", "epsilon", "--stat", "median", "--band", "0.1,0.9", "--seeds",
                 "--yscale", "log", "--out", str(tmp_path / "tails.png")]) == 0
    ax = figures[0].axes[0]
    assert (ax.get_xscale(), ax.get_yscale()) == ("linear", "log")
    assert "median, 10-90% quantiles over seed; thin lines: each learner" in figures[0]._suptitle.get_text()
    ds = stored.results()
    lines = [ln for ln in ax.get_lines() if ln.get_gid() != "seed"]
    for line, eps in zip(lines, ds.epsilon.values, strict=True):
        np.testing.assert_allclose(line.get_ydata(), np.nanmedian(ds.train_loss.sel(epsilon=eps).values, axis=0))
    assert len([ln for ln in ax.get_lines() if ln.get_gid() == "seed"]) == 5  # the learners of the grid
    assert main(["plot", path, "control_distance", "--kind", "scaling", "--stat", "geomean", "--band", "none",
                 "--out", str(tmp_path / "growth.png")]) == 0
    assert "geometric mean over seed" in figures[1]._suptitle.get_text() and not figures[1].axes[0].collections
    with pytest.raises(SystemExit, match=r"band=\(0\.9, 0\.1\): use 'std', 'quantiles'"):
        main(["plot", path, "train_loss", "--band", "0.9,0.1"])
    with pytest.raises(SystemExit, match="--band, --seeds and --yscale draw lines"):
        main(["plot", path, "train_loss", "--kind", "heatmap", "--by", "epsilon", "--y", "seed", "--seeds"])


def test_plot_refuses_what_the_store_does_not_have_with_what_it_has(stored):
    path = str(stored.store.path)
    with pytest.raises(SystemExit, match=r"epsilon has no value '0\.5'; its values: \[0\.0, 0\.01, 0\.1\]"):
        main(["plot", path, "test_loss", "--sel", "epsilon=0.5"])
    with pytest.raises(SystemExit, match="The result has no metric 'accuracy'; it has: train_loss"):
        main(["plot", path, "accuracy"])
    with pytest.raises(SystemExit, match="no such store"):
        main(["ls", str(stored.store.path.with_name("missing.zarr"))])


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run([sys.executable, "-m", "serimats_func", "demo", "--help"], capture_output=True, text=True,
                            check=True)
    assert "--epochs" in result.stdout


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_examples_run_and_say_what_the_readme_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in readme_python_blocks():
        exec(compile(block, "README.md", "exec"), namespace)
    ds = namespace["ds"]
    assert dict(ds.test_acc.sizes) == {"epsilon": 4, "seed": 10, "step": 2}
    assert int(ds.test_acc.isel(step=-1).notnull().sum()) == 31
    assert np.isnan(ds.test_acc.sel(epsilon=0, seed=1)).all()
    assert namespace["fig"].axes[0].get_ylabel() == "test accuracy"
    assert store_paths.metadata(tmp_path / "runs" / "perturb.zarr").exists()
    augmented = namespace["augmented"]  # the CIFAR-style example: random crop and flip in the step
    assert dict(augmented.test_acc.sizes) == {"crop": 2, "seed": 2, "step": 4}
    assert float(augmented.test_acc.isel(step=-1).min()) > 0.5  # chance is 0.1
    groups = namespace["groups"]  # Muon with AdamW on the biases and a rate of its own on the last layer
    assert dict(groups.train_loss.sizes) == {"lr": 2, "lr[5.weight]": 2, "step": 2}
    assert groups["optimizer[*.bias]"].item() == "AdamW" and groups["lr[*.bias]"].item() == 3e-4
    assert len(np.unique(groups.train_loss.isel(step=-1))) == 4
    cosine = namespace["cosine"]  # warmup + cosine: two schedules, two trajectories
    assert dict(cosine.train_loss.sizes) == {"T_max": 2, "step": 2} and cosine.warmup.item() == 10
    assert cosine.train_loss.isel(step=-1).diff("T_max").item() != 0
    spawned, between = namespace["spawned"], namespace["between"]  # children spawned at 50; the path between two
    assert (spawned.control_barrier.sel(at=50, seed=[1, 2], step=[0, 50]) == 0).all()
    assert spawned.control_barrier.sel(at=50, seed=[1, 2], step=200).notnull().all()
    assert between.alpha.values.tolist() == [0, 0.25, 0.5, 0.75, 1] and between.attrs["step_a"] == 100
    tails = namespace["tails"]  # the heavy-tail plot: the median, on a log value axis, each seed a thin line
    drift = namespace["drift"]
    assert (tails.axes[0].get_xscale(), tails.axes[0].get_yscale()) == ("linear", "log")
    median = [ln.get_ydata() for ln in tails.axes[0].get_lines() if ln.get_gid() != "seed"]
    np.testing.assert_allclose(median, np.nanmedian(drift.control_distance.transpose("epsilon", "step", "seed"), axis=-1))
    assert len([ln for ln in tails.axes[0].get_lines() if ln.get_gid() == "seed"]) == 7  # the control and 2 x 3
