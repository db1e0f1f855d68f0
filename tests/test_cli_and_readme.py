"""The demo command and the README's examples run as a new user would run them."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from serimats_func.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_demo_trains_31_learners_writes_store_and_plot_then_reuses_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--epochs", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "31 learners in the grid" in out and "trained 31 learners, 0 reused" in out
    rows = re.findall(r"^\s+(0\.?\d*)\s+(\d+)\s+(0\.\d+) ± (0\.\d+)", out, flags=re.M)
    assert [(eps, n) for eps, n, _, _ in rows] == [("0", "1"), ("0.001", "10"), ("0.01", "10"), ("0.1", "10")]
    assert all(float(acc) > 0.2 for _, _, acc, _ in rows)  # one epoch is well above chance (0.1)
    png = tmp_path / "runs" / "demo_test_acc.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main(["demo", "--epochs", "1", "--no-progress"]) == 0
    assert "trained 0 learners, 31 reused" in capsys.readouterr().out


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
    assert dict(ds.sizes) == {"epsilon": 4, "seed": 10, "step": 2}
    assert int(ds.test_acc.isel(step=-1).notnull().sum()) == 31
    assert np.isnan(ds.test_acc.sel(epsilon=0, seed=1)).all()
    assert namespace["fig"].axes[0].get_ylabel() == "test accuracy"
    assert (tmp_path / "runs" / "perturb.zarr" / "zarr.json").exists()


def test_the_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    notebook = json.loads((ROOT / "notebooks" / "first_sweep.ipynb").read_text())
    namespace: dict = {}
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            source = "".join(cell["source"]).replace("epochs=5", "epochs=1")  # shorter, same code
            exec(compile(source, "first_sweep.ipynb", "exec"), namespace)
    assert dict(namespace["ds"].sizes) == {"epsilon": 4, "seed": 10, "step": 2}
    assert len(namespace["final"].sel(epsilon=[0.001, 0.01, 0.1]).seed) == 10
