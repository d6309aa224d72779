"""The PNG figures of the reports: matplotlib without a display, each figure written and closed."""
from __future__ import annotations

import os
from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: reports are also written where there is no display
    (servers, CI), and the import stays out of the commands that draw nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_png(fig, path: str | os.PathLike, dpi: int) -> Path:
    """Write ``fig`` to ``path`` (its folder created) at ``dpi`` and close it (a report draws many figures
    in one process); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
