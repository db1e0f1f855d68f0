"""Every notebook runs top to bottom, in-process, and draws readable plots; notebooks are stored without outputs.

The tests run each notebook small: the notebooks read ``SERIMATS_QUICK=1`` (fewer steps, seeds and examples;
the code is the same). ``SERIMATS_MNIST`` points them to the MNIST files when ../shared/data/mnist has them
(LeNet-5 on real digits); without them the notebooks use MNIST-1D and an MLP.
"""

import json
from pathlib import Path

import pytest

from serimats_func import plotter as plotting
from tests.readable import assert_png_not_blank, assert_readable

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MNIST = ROOT.parent / "shared" / "data" / "mnist"


def code_cells(path: Path) -> list[str]:
    return ["".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_notebooks_are_stored_without_outputs():
    assert {p.stem for p in NOTEBOOKS} >= {"perturbation_at_init", "optimizers", "momentum_window", "custom_logger"}
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name} has outputs: strip them"


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
