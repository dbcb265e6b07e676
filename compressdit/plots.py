"""Matplotlib figures drawn off-screen into PNG files: the one plotting helper every stage and method uses.

A leaf module (matplotlib only), so that methods (``quant/``, ``prune/``) and stages can draw their report figures
without importing the report renderer.
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_axes(width: float, height: float) -> tuple[Figure, Any]:
    """A figure of ``width`` x ``height`` inches on the Agg canvas (no display, thread-safe) and its axes."""
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def plot_to_file(draw: Callable[[Any], None], width: float = 6.0, height: float = 3.5) -> str:
    """Draw on fresh axes with ``draw(ax)`` and save a PNG in a temp file (for a report's figures)."""
    fig, ax = new_axes(width, height)
    draw(ax)
    fig.tight_layout()
    path = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
    fig.savefig(path, dpi=110)
    return path
