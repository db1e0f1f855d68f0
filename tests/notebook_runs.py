"""Run a notebook as Jupyter does (nbclient, a real kernel), keep its outputs small, and read their structure.

The notebooks in notebooks/ are stored with their outputs (a reader on GitHub sees the plots). To store them again
after a change, from the project's root:

    OMP_NUM_THREADS=1 python -m tests.notebook_runs            # every notebook; or name some: first_sweep ...

which runs each at full size in a fresh temporary folder (with ``SERIMATS_MNIST`` set to ../shared/data/mnist
when that folder is there, as the notebooks' default finds it from notebooks/) and writes it back, tidied
(``tidy``). The tests run them
small (``SERIMATS_QUICK=1``) and compare the kinds of outputs of each cell with the stored ones (``structure``).
"""

from __future__ import annotations

import base64
import io
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
MNIST = ROOT.parent / "shared" / "data" / "mnist"  # the notebooks' default, ../../shared/data/mnist from notebooks/
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"  # a live widget; stored notebooks keep its text form
PNG_COLOURS = 128
CELL_TIMEOUT = 1800  # seconds a cell may run (a full-size notebook on a busy 2-core CPU)


def execute(path: Path, cwd: Path, timeout: int = CELL_TIMEOUT) -> nbformat.NotebookNode:
    """The notebook at ``path`` executed top to bottom in a fresh kernel started in ``cwd`` (the kernel inherits
    this process's environment, with the project's root on ``PYTHONPATH``), tidied."""
    nb = nbformat.read(path, as_version=4)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}},
                            record_timing=False, store_widget_state=False)
    client.execute(env=env)
    nb.metadata.language_info = {"name": nb.metadata.language_info["name"]}  # not the kernel's version numbers
    return tidy(nb)


def tidy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """What is stored: each cell's consecutive outputs of one stream merged into one, each line as a terminal
    shows it (the text after its last carriage return), widget views and xarray's HTML left to their text form,
    PNGs in 128 colours (a third of the bytes; a plot's lines and bands need no more), no timings."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.metadata.pop("execution", None)
        outputs = []
        for out in cell.outputs:
            if out.output_type == "stream" and outputs and outputs[-1].output_type == "stream" \
                    and outputs[-1].name == out.name:
                outputs[-1].text += out.text
                continue
            if "data" in out:
                out.data.pop(WIDGET_VIEW, None)
                if out.data.get("text/plain", "").startswith("<xarray."):
                    out.data.pop("text/html", None)  # xarray's: 50 kB of inline CSS and icons, which GitHub strips
                if "image/png" in out.data:
                    out.data["image/png"] = small_png(out.data["image/png"])
            outputs.append(out)
        for out in outputs:
            if out.output_type == "stream":
                out.text = re.sub(r"[^\n]*\r(?!\n)", "", out.text)
        cell.outputs = outputs
    return nb


def small_png(data: str) -> str:
    """A base64 PNG (as notebooks hold them) in at most ``PNG_COLOURS`` colours, on its white background."""
    image = Image.open(io.BytesIO(base64.b64decode(data))).convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    out = io.BytesIO()
    image.quantize(colors=PNG_COLOURS, method=Image.Quantize.MEDIANCUT).save(out, "PNG", optimize=True)
    return base64.b64encode(out.getvalue()).decode("ascii") + "\n"


def structure(nb: nbformat.NotebookNode) -> list[list[str]]:
    """The kinds of outputs of each code cell, in order: ``stream:stdout``, ``display_data:image/png,text/plain``,
    ``execute_result:text/html,text/plain``, ``error:NameError``. Not their values (numbers and pixels differ from
    run to run and between the stored full-size runs and the tests' small ones)."""
    def kind(out) -> str:
        if out.output_type == "stream":
            return f"stream:{out.name}"
        if out.output_type == "error":
            return f"error:{out.ename}"
        return f"{out.output_type}:{','.join(sorted(out.data))}"

    return [[kind(out) for out in cell.outputs] for cell in nb.cells if cell.cell_type == "code"]


def store(path: Path) -> None:
    """Execute ``path`` at full size in a fresh folder (its stores empty: every learner trains, as a reader's first
    run does) and write it back with its outputs."""
    os.environ.pop("SERIMATS_QUICK", None)
    if (MNIST / "MNIST" / "raw").is_dir():
        os.environ["SERIMATS_MNIST"] = str(MNIST)
    with tempfile.TemporaryDirectory() as folder:
        nbformat.write(execute(path, Path(folder)), path)


def main(names: list[str]) -> None:
    paths = [NOTEBOOKS / f"{n}.ipynb" for n in names] if names else sorted(NOTEBOOKS.glob("*.ipynb"))
    for path in paths:
        start = time.perf_counter()
        store(path)
        print(f"{path.name}: stored with its outputs ({time.perf_counter() - start:.0f} s, "
              f"{path.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main(sys.argv[1:])
