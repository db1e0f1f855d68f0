"""Every notebook runs top to bottom, in-process, and draws readable plots; it runs in a Jupyter kernel and its
outputs have the structure of the stored ones; notebooks are stored with their outputs, from one clean run.

The tests run each notebook small: the notebooks read ``SERIMATS_QUICK=1`` (fewer steps, seeds and examples;
the code is the same). ``SERIMATS_MNIST`` points them to the MNIST files when ../shared/data/mnist has them
(LeNet-5 on real digits); without them the notebooks use MNIST-1D and an MLP. To store them again after a
change: ``python -m tests.notebook_runs`` (see tests/notebook_runs.py).
"""

import base64
import json
from pathlib import Path

import pytest

from serimats_func import plotter as plotting
from tests import notebook_runs
from tests.readable import assert_png_not_blank, assert_readable

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def code_cells(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def stored(path: Path) -> dict:
    return json.loads(path.read_text())


def outputs(path: Path) -> list[list[dict]]:
    return [c["outputs"] for c in stored(path)["cells"] if c["cell_type"] == "code"]


def test_notebooks_are_stored_with_their_outputs_from_one_clean_run_top_to_bottom():
    assert {p.stem for p in NOTEBOOKS} >= {"perturbation_at_init", "optimizers", "momentum_window", "custom_logger"}
    for path in NOTEBOOKS:
        cells = [c for c in stored(path)["cells"] if c["cell_type"] == "code"]
        counts = [c["execution_count"] for c in cells]
        assert counts == list(range(1, len(cells) + 1)), f"{path.name}: run it again, top to bottom: " \
                                                         "python -m tests.notebook_runs " + path.stem
        assert all(c["outputs"] for c in cells[1:]), f"{path.name}: a cell shows nothing"
        assert not [c["metadata"] for c in cells if "execution" in c["metadata"]], f"{path.name} stores timings"
        assert stored(path)["metadata"]["language_info"] == {"name": "python"}  # no version numbers
        kinds = [o.get("name") or o["output_type"] for c in cells for o in c["outputs"]]
        assert "error" not in kinds and "stderr" not in kinds, f"{path.name} stores an error or a warning"


def test_stored_notebooks_show_their_plots_and_stay_small():
    for path in NOTEBOOKS:
        images = [o["data"]["image/png"] for cell in outputs(path) for o in cell if "image/png" in o.get("data", {})]
        assert images, f"{path.name} shows no plot"
        for data in images:
            png = base64.b64decode(data)
            assert png.startswith(b"\x89PNG") and len(png) < 40_000, f"{path.name}: a PNG of {len(png)} bytes"
        mimes = {m for cell in outputs(path) for o in cell for m in o.get("data", {})}
        assert notebook_runs.WIDGET_VIEW not in mimes  # a widget's view: no viewer outside a live kernel shows it
        assert path.stat().st_size < 300_000, f"{path.name} is {path.stat().st_size} bytes"


def check_perturbation_at_init(ns, out):
    ds = ns["ds"]
    assert (ds.control_distance.sel(epsilon=0, seed=0) == 0).all()
    final = ds.control_distance.isel(step=-1).mean("seed")
    assert final.sel(epsilon=0.001) < final.sel(epsilon=0.1)
    assert (Path("runs") / "perturbation_at_init_plots" / "scaling_control_distance.png").exists()


def check_optimizers(ns, out):
    assert ns["ds"].test_acc.sizes["optimizer"] == 2 and ns["ds"].test_acc.notnull().all()


def check_momentum_window(ns, out):
    assert ns["ds"].when.values.tolist()[1:] == [f"{a}-{b}" for a, b in ((0, 1), (4, 5), (8, 9))]


def check_custom_logger(ns, out):
    assert "Metric 'weight_space_distance' failed on a learner: torch.dist got tensors of shapes (120, " in out
    assert {"weight_norm", "fc2_unit_norms", "test_margin", "batch_grad_norm"} <= set(ns["ds"].data_vars)
    assert (ns["ds"].fc1_distance_to_control.sel(epsilon=0, seed=0) == 0).all()


def check_linear_mode_connectivity(ns, out):
    ds, children, spawn = ns["ds"], list(ns["children"]), ns["spawn_steps"]
    assert (ds.control_barrier.sel(seed=0, at=0) == 0).all()  # the control against itself
    late = spawn[-1]
    before = ds.control_barrier.sel(seed=children, at=late, step=ds.step <= late)
    assert (before == 0).all()  # before its spawn step a child is the control
    assert ds.control_barrier.sel(seed=children, step=ns["steps"]).notnull().all()
    assert ds.control_barrier_curve.sizes["alpha"] == 11
    assert "error barrier:" in out and ns["path"].error.sizes == {"alpha": 11}


def check_first_sweep(ns, out):
    assert dict(ns["ds"].test_acc.sizes) == {"epsilon": 4, "seed": 10, "step": 2}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_runs_top_to_bottom_and_draws_readable_plots(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SERIMATS_QUICK", "1")
    if (MNIST / "MNIST" / "raw").is_dir():
        monkeypatch.setenv("SERIMATS_MNIST", str(MNIST))
    figures = []
    real_finish = plotting._finish
    monkeypatch.setattr(plotting, "_finish", lambda fig: figures.append(real_finish(fig)) or fig)
    namespace: dict = {}
    for source in code_cells(path):
        exec(compile(source, path.name, "exec"), namespace)
    globals()[f"check_{path.stem}"](namespace, capsys.readouterr().out)
    assert figures, "the notebook draws nothing"
    for i, fig in enumerate(figures):
        assert_readable(fig)
        fig.savefig(tmp_path / f"figure{i}.png")
        assert_png_not_blank(tmp_path / f"figure{i}.png")
    for png in (tmp_path / "runs").rglob("*.png"):  # what run(plot=True) wrote
        assert_png_not_blank(png)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_runs_in_a_jupyter_kernel_with_the_stored_outputs_kinds_cell_by_cell(path, tmp_path, monkeypatch):
    """Stored outputs are not stale in structure: each cell shows the same kinds of outputs (a text stream, a
    figure, a table...) in a fresh kernel as in the stored notebook, with no warning (no stderr stream)."""
    monkeypatch.setenv("SERIMATS_QUICK", "1")
    if (MNIST / "MNIST" / "raw").is_dir():
        monkeypatch.setenv("SERIMATS_MNIST", str(MNIST))
    ran = notebook_runs.execute(path, tmp_path, timeout=600)
    fresh, kept = notebook_runs.structure(ran), notebook_runs.structure(notebook_runs.nbformat.read(path, 4))
    sources = [c.source.splitlines()[0] for c in ran.cells if c.cell_type == "code"]
    stale = [f"cell {i + 1} ({sources[i]!r}): now {now}, stored {then}"
             for i, (now, then) in enumerate(zip(fresh, kept, strict=True)) if now != then]
    assert not stale, f"{path.name}: run python -m tests.notebook_runs {path.stem}; " + "; ".join(stale)
    images = [o.data["image/png"] for c in ran.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    for i, data in enumerate(images):
        (tmp_path / f"output{i}.png").write_bytes(base64.b64decode(data))
        assert_png_not_blank(tmp_path / f"output{i}.png")
