"""Figures drawn without pyplot, so that writing a PNG never changes the process's matplotlib backend (a notebook's
inline plots keep working after `gcvit.train()`) nor leaves a figure registered with pyplot."""

from __future__ import annotations

from typing import Any


def subplots(nrows: int = 1, ncols: int = 1, **figure: Any) -> tuple[Any, Any]:
    """(figure, axes) as `pyplot.subplots` gives them; `figure` takes Figure's arguments (figsize, ...). Raises
    ImportError without matplotlib. `fig.savefig` writes the file through the Agg renderer."""
    from matplotlib.figure import Figure

    fig = Figure(**figure)
    return fig, fig.subplots(nrows, ncols)
