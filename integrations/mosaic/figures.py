"""Reconstruction figures like the paper's figures 12-19 (appendix G).

Columns are test images; rows are the shuffled input, the reconstruction P_t^T x for every inner step
t = 0..T of the permutation optimisation (t = 0 is S(P~(0)): the uniform start for PO-U, the linear
assignment for PO-LA / LinAssign), the final Hungarian assignment, and the target image.
"""
from __future__ import annotations

from pathlib import Path

import torch

import setperm
from integrations.common.figures import pyplot, write_png

from .tiles import assemble, gather_positions
from .train import EVAL_SEED, MosaicData, _gen, batch_tiles


@torch.no_grad()
def reconstruction_rows(mosaic, data: MosaicData, n: int, k: int = 8):
    """[(label, images (k, C, H, W) in [0, 1])] for the first k test images, one entry per figure row."""
    mosaic.eval()
    x = data.test_x[:k]
    shuffled, target, _ = batch_tiles(x, n, _gen(EVAL_SEED, n))
    steps = mosaic.permutation(shuffled, return_steps=True)
    steps = steps if isinstance(steps, (list, tuple)) else [steps]
    rows = [("input", shuffled)]
    rows += [(f"t={t}", setperm.functional.apply_permutation(shuffled, P)) for t, P in enumerate(steps)]
    rows.append(("Hungarian", gather_positions(shuffled, setperm.functional.hungarian(steps[-1]))))
    rows.append(("target", target))
    return [(name, data.denormalise(assemble(t, n))) for name, t in rows]


def save_figure(rows, path: str | Path, title: str = "", scale: float = 0.9) -> Path:
    plt = pyplot()

    k = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), k, figsize=(scale * k + 1.1, scale * len(rows) + 0.5), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(k):
            ax = axes[r][c]
            img = imgs[c].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([]); ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3, rect=(0.02, 0, 1, 0.97))  # keep room for the title and the row labels
    return write_png(fig, path, dpi=80)
