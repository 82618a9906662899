"""What the notebooks show: figures as PNG files, displayed inline under IPython and printed as
paths in a plain script (the experiments modules select matplotlib's Agg backend on import, so
inline plotting is off in a kernel once they are loaded)."""
from __future__ import annotations

import os

import matplotlib.pyplot as plt


def ipython_display():
    """``IPython.display`` when running in an IPython kernel or shell, else None."""
    try:
        from IPython import display, get_ipython
    except ImportError:
        return None
    return display if get_ipython() is not None else None


def show(fig, workdir: str, name: str) -> str:
    """Write ``fig`` to ``workdir/name.png``, close it, display it (or print its path)."""
    path = os.path.join(workdir, name + ".png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    display = ipython_display()
    display.display(display.Image(path)) if display else print("figure:", path)
    return path


def show_written(workdir: str, name: str) -> None:
    """Display (or print) a written figure: ``workdir/name.png`` and its table ``name.md``."""
    stem, display = os.path.join(workdir, name), ipython_display()
    display.display(display.Image(stem + ".png")) if display else print("figure:", stem + ".png")
    with open(stem + ".md") as f:
        display.display(display.Markdown(f.read())) if display else print(f.read())
