"""Checks that a plot can be read: it says what it shows, and its PNG is not blank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.image import imread


def assert_readable(fig: Figure) -> None:
    """A title, labelled axes, a legend when a panel has several lines, and something drawn."""
    panels = [ax for ax in fig.axes if ax.get_lines() or ax.images]  # colorbars and empty panels aside
    assert panels, "nothing drawn"
    title = fig._suptitle.get_text() if fig._suptitle is not None else ""
    assert title or all(ax.get_title() for ax in panels), "no title"
    assert any(ax.get_xlabel() for ax in panels) and any(ax.get_ylabel() for ax in panels), "unlabelled axes"
    for ax in panels:
        if len(ax.get_lines()) > 1:
            assert ax.get_legend() is not None or fig.legends, f"several lines and no legend in {ax.get_title()!r}"


def assert_png_not_blank(path: str | Path) -> None:
    """A PNG whose pixels are not all one colour, with a fair share of them drawn on."""
    pixels = imread(str(path))[..., :3].reshape(-1, 3)
    background = pixels[0]
    drawn = np.any(np.abs(pixels - background) > 0.05, axis=1).mean()
    assert drawn > 0.01, f"{path} is (almost) blank: {drawn:.2%} of its pixels are drawn"
