"""What a Jupyter kernel gets: one live progress bar, and a few figures inline.

- ``progress_bar(total=..., desc=..., unit=...)``: in Jupyter, a widget bar (``tqdm.notebook``) when ipywidgets
  is installed, else one line of text updated in place (a display updated by id, never a stream of lines nor
  tqdm's ``IProgress not found`` warning); elsewhere tqdm's text bar on stderr.
- ``show_inline(paths, written, folder)``: in Jupyter, the PNG files ``paths`` below the cell and one line that
  says where the other ``written`` files are; elsewhere nothing.

Outside a kernel both behave as plain tqdm and plain files do:

>>> bar = progress_bar(total=3, desc="demo", unit=" steps", disable=True)
>>> bar.update(3); bar.close()
>>> in_jupyter()
False
"""

from __future__ import annotations

import base64
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm


def in_jupyter() -> bool:
    """Whether this code runs in a Jupyter kernel (a notebook, JupyterLab, VS Code...), not a terminal IPython."""
    ipython = sys.modules.get("IPython")  # never imported here: a script that did not import it is not in Jupyter
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and hasattr(shell, "kernel")


def widgets_available() -> bool:
    """Whether tqdm can draw its widget bar (ipywidgets importable)."""
    from tqdm import notebook

    return notebook.IProgress is not None


def progress_bar(total: int, desc: str, unit: str, disable: bool = False) -> tqdm:
    """One progress bar (see the module's docstring for which kind)."""
    if disable or not in_jupyter():
        return tqdm(total=total, desc=desc, unit=unit, disable=disable)
    if widgets_available():
        return _widget_bar()(total=total, desc=desc, unit=unit)  # the class is made when first needed: ipywidgets is optional
    return tqdm(total=total, desc=desc, unit=unit, file=_DisplayLine())  # a bar of 10 characters, never cut


def _display(*args, **kwargs) -> object:
    from IPython import display  # looked up at each call (tests replace it)

    return display.display(*args, **kwargs)


class _DisplayLine:
    """A file for tqdm's text bar: each bar written replaces the one shown before (one display output, updated
    by its id), so a notebook keeps one line, the last one."""

    encoding = "utf-8"  # tqdm draws its unicode bar into files that declare it

    def __init__(self):
        self.id: str | None = None

    def write(self, text: str) -> None:
        line = text.rsplit("\r", 1)[-1].rstrip()  # tqdm writes "\r<bar><padding>", then "\n" at the end
        if not line:
            return
        if self.id is None:
            self.id = _display({"text/plain": line}, raw=True, display_id=True).display_id
        else:
            _display({"text/plain": line}, raw=True, display_id=self.id, update=True)

    def flush(self) -> None:
        pass


@functools.cache
def _widget_bar() -> type:
    from tqdm.notebook import tqdm as notebook_tqdm

    class WidgetBar(notebook_tqdm):
        """tqdm's widget bar, displayed by id: at the end it is displayed again, with the final bar in full as its
        text form (what a stored notebook or a viewer without widgets shows), not the empty bar it started as."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs, display=False)
            self.handle = _display(self.container, display_id=True)
            self.displayed = True

        def close(self) -> None:
            shown = not self.disable  # tqdm's close disables the bar
            super().close()
            if shown:
                bundle = {**self.container._repr_mimebundle_(), "text/plain": self.container.__repr__(True)}
                _display(bundle, raw=True, display_id=self.handle.display_id, update=True)

    return WidgetBar


def show_inline(paths: Sequence[Path], written: Sequence[Path], folder: Path) -> None:
    """In Jupyter, show the PNG files ``paths`` below the cell, then name the rest of ``written`` (in ``folder``);
    elsewhere do nothing."""
    if not in_jupyter():
        return
    for path in paths:
        _display({"image/png": base64.b64encode(Path(path).read_bytes()).decode("ascii")}, raw=True)
    rest = [p.name for p in written if p not in paths]
    if rest:
        print(f"{len(rest)} more plot{'s' if len(rest) > 1 else ''} in {folder}/: {', '.join(rest)}")
