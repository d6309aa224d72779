"""Image preparation, tiling, shuffling and re-assembly of n x n mosaics (paper section 4.2, appendix F.2).

Tile layout: ``tiles`` (B, N, C, h, w) with N = n*n and position k = r*n + c (row-major), the same
order as the lattice convention of ``setperm`` (``grid=(n, n)``: channel 0 compares left-to-right
neighbours inside a grid row, channel 1 top-to-bottom neighbours inside a grid column).

Shuffling: ``shuffled[b, i] = tiles[b, perm[b, i]]``. The tile at input index i belongs at position
``perm[b, i]``, so the target permutation matrix is ``P[b, i, perm[b, i]] = 1`` (rows = elements,
columns = positions, as in ``setperm``) and the target Hungarian index is ``argsort(perm)``
(``idx[b, k]`` = input element that belongs at position k).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def mosaic_size(size: int, n: int) -> int:
    """Side of the square image fed to an n x n mosaic: the nearest size >= ``size`` divisible by n (F.2)."""
    if n < 1:
        raise ValueError(f"tiles: expected n >= 1, got {n}")
    return n * math.ceil(size / n)


def prepare_images(images: torch.Tensor, n: int, mean: torch.Tensor, std: torch.Tensor,
                   chunk: int = 2048) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 (B, C, S, S), normalised and ready to cut into n x n tiles.

    Paper F.2: centre-crop rectangular images to a square of the shorter side, rescale images whose
    side is not divisible by n to the nearest bigger divisible size (bilinear), normalise to zero mean
    and unit variance with the training-split statistics ``mean``/``std`` (C,).
    """
    if images.dim() != 4:
        raise ValueError(f"images: expected (B, C, H, W), got shape {tuple(images.shape)}")
    if mean.shape != (images.shape[1],) or std.shape != (images.shape[1],):
        raise ValueError(f"mean/std: expected ({images.shape[1]},), got {tuple(mean.shape)} / {tuple(std.shape)}")
    h, w = images.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    size = mosaic_size(s, n)
    out = torch.empty(images.shape[0], images.shape[1], size, size)
    m, sd = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    for i in range(0, images.shape[0], chunk):
        x = images[i: i + chunk, :, top: top + s, left: left + s].float() / 255.0
        if size != s:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out[i: i + chunk] = (x - m) / sd
    return out


def to_tiles(images: torch.Tensor, n: int) -> torch.Tensor:
    """(B, C, H, W) with H, W divisible by n -> tiles (B, n*n, C, H/n, W/n), position k = r*n + c."""
    if images.dim() != 4 or images.shape[-1] % n or images.shape[-2] % n:
        raise ValueError(f"images: expected (B, C, H, W) with H and W divisible by {n}, got {tuple(images.shape)}")
    b, c, hh, ww = images.shape
    h, w = hh // n, ww // n
    return images.reshape(b, c, n, h, n, w).permute(0, 2, 4, 1, 3, 5).reshape(b, n * n, c, h, w)


def assemble(tiles: torch.Tensor, n: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`to_tiles`: tiles (B, n*n, C, h, w) -> images (B, C, n*h, n*w)."""
    if tiles.dim() != 5:
        raise ValueError(f"tiles: expected (B, N, C, h, w), got shape {tuple(tiles.shape)}")
    b, N, c, h, w = tiles.shape
    n = n or math.isqrt(N)
    if n * n != N:
        raise ValueError(f"tiles: N={N} is not a square number of tiles")
    return tiles.reshape(b, n, n, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(b, c, n * h, n * w)


def random_permutations(batch: int, N: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(batch, N) long, each row an independent uniform random permutation of 0..N-1."""
    return torch.rand(batch, N, generator=generator).argsort(dim=1)


def shuffle_tiles(tiles: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """shuffled[b, i] = tiles[b, perm[b, i]]; tiles (B, N, ...), perm (B, N) long."""
    if perm.shape != tiles.shape[:2]:
        raise ValueError(f"perm: expected {tuple(tiles.shape[:2])}, got {tuple(perm.shape)}")
    idx = perm.view(*perm.shape, *([1] * (tiles.dim() - 2))).expand_as(tiles)
    return tiles.gather(1, idx)


def target_index(perm: torch.Tensor) -> torch.Tensor:
    """The correct Hungarian answer for ``shuffle_tiles(tiles, perm)``: idx[b, k] = input index of the tile at k."""
    return perm.argsort(dim=1)


def gather_positions(shuffled: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Hard reconstruction: out[b, k] = shuffled[b, idx[b, k]] (idx as returned by ``setperm.functional.hungarian``)."""
    return shuffle_tiles(shuffled, idx)
