"""Contact sheets: the images a person should look at, each with its caption, in one PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLUMNS = 8


def contact_sheet(tiles: list[tuple[np.ndarray, str]], title: str, path: Path) -> Path | None:
    """Write ``(thumbnail, caption)`` tiles in rows of :data:`COLUMNS` to ``path`` (PNG).

    Returns:
        ``path``, or None when there is nothing to show.
    """
    if not tiles:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(tiles) // COLUMNS)
    figure, axes = plt.subplots(rows, COLUMNS, figsize=(COLUMNS * 1.7, rows * 2.2), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, (pixels, caption) in zip(axes.flat, tiles, strict=False):
        axis.imshow(pixels, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axis.set_title(caption, fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def short(key: str, width: int = 22) -> str:
    """A file name short enough for a caption."""
    return key if len(key) <= width else "..." + key[-(width - 3) :]
