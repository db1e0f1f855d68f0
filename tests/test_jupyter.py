"""In Jupyter, training shows one live progress bar: a widget with ipywidgets, else one line of text updated in
place (never tqdm's ``IProgress not found`` warning nor a line per update); run(plot=True) shows a few figures and
names the rest (tests/test_plots.py). Outside Jupyter, tqdm's text bar on stderr as before. The last test runs
both in a real kernel."""

import types

import nbformat
import pytest
from tqdm import tqdm

from serimats_func import jupyter
from serimats_func.interventions import PerturbWeights
from tests import notebook_runs


class FakeDisplay:
    """IPython's ``display`` as a kernel answers it: a display id for ``display_id=True``."""

    def __init__(self):
        self.calls: list[tuple[object, object, bool]] = []

    def __call__(self, obj, raw=False, display_id=None, update=False):
        self.calls.append((obj, display_id, update))
        return types.SimpleNamespace(display_id="bar-1") if display_id is True else None


def grid(experiment, **settings):
    return experiment([PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=range(2))], steps=6, **settings)


def test_outside_jupyter_the_bar_is_tqdms_text_on_stderr(experiment, capsys):
    bar = jupyter.progress_bar(total=4, desc="demo", unit=" learner-steps")
    assert type(bar) is tqdm
    bar.close()
    grid(experiment, progress=True).run()
    captured = capsys.readouterr()
    assert captured.out == "" and "100%" in captured.err and "24/24" in captured.err


def test_in_jupyter_without_ipywidgets_the_bar_is_one_line_updated_in_place(experiment, monkeypatch, capsys):
    display = FakeDisplay()
    monkeypatch.setattr(jupyter, "in_jupyter", lambda: True)
    monkeypatch.setattr(jupyter, "widgets_available", lambda: False)
    monkeypatch.setattr(jupyter, "_display", display)
    grid(experiment, progress=True).run()  # a warning would fail the test (pytest: filterwarnings = error)
    (first, first_id, _), *updates = display.calls
    assert first_id is True and updates and all(i == "bar-1" and update for _, i, update in updates)
    lines = [obj["text/plain"] for obj, _, _ in display.calls]
    assert all("\n" not in line and "\r" not in line for line in lines)
    assert "100%" in lines[-1] and "24/24 [" in lines[-1] and "learner-steps" in lines[-1]
    assert capsys.readouterr() == ("", "")  # nothing on the streams


def test_in_jupyter_with_ipywidgets_the_widget_bar_is_displayed_again_at_the_end_as_the_final_bar(monkeypatch):
    pytest.importorskip("ipywidgets")
    display = FakeDisplay()
    monkeypatch.setattr(jupyter, "in_jupyter", lambda: True)
    monkeypatch.setattr(jupyter, "_display", display)
    bar = jupyter.progress_bar(total=5, desc="demo", unit=" learner-steps")
    bar.update(5)
    bar.close()
    (shown, first_id, _), (again, again_id, update) = display.calls
    assert shown is bar.container and (first_id, again_id, update) == (True, "bar-1", True)
    assert again[notebook_runs.WIDGET_VIEW]["model_id"] == bar.container.model_id  # the same widget, live
    assert again["text/plain"].startswith("demo: 100%|██████████| 5/5 [")  # in full, however long


KERNEL_CELLS = [
    "import sys\nsys.modules['ipywidgets'] = None if BLOCK else sys.modules.get('ipywidgets')  # as if not installed",
    "from serimats_func.interventions import PerturbWeights\nfrom tests.builders import make_experiment\n"
    "exp = make_experiment([PerturbWeights.make_variations(epsilon=0, seed=0, control=True),\n"
    "                       PerturbWeights.make_variations(epsilon=(0.01, 0.1), seed=range(2))],\n"
    "                      store='runs/kernel.zarr', steps=8, log_every=4, progress=True)\n"
    "ds = exp.run(plot=True)",
]


@pytest.mark.slow
@pytest.mark.parametrize("widgets", [False, True], ids=["without-ipywidgets", "with-ipywidgets"])
def test_in_a_jupyter_kernel_a_run_shows_one_bar_two_figures_and_a_line_naming_the_other_plots(widgets, tmp_path):
    if widgets:
        pytest.importorskip("ipywidgets")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"BLOCK = {not widgets}\n" + KERNEL_CELLS[0]),
                                         nbformat.v4.new_code_cell(KERNEL_CELLS[1])])
    path = tmp_path / "kernel.ipynb"
    nbformat.write(nb, path)
    ran = notebook_runs.execute(path, tmp_path, timeout=300)
    outs = ran.cells[1].outputs
    assert notebook_runs.structure(ran)[1] == ["display_data:text/plain", "display_data:image/png",
                                               "display_data:image/png", "stream:stdout"]
    assert outs[0].data["text/plain"].startswith("perturb-weights: 100%") and "40/40 [" in outs[0].data["text/plain"]
    written = sorted(p.name for p in (tmp_path / "runs" / "kernel_plots").iterdir())
    assert outs[3].text.startswith(f"{len(written) - 2} more plots in runs/kernel_plots/: curves_train_loss.png, ")
