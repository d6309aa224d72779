"""Mosaic models (paper section 4.2, appendix F.2 and figure 10) on top of ``setperm``.

Per tile: 5x5 convolution (padding 2, stride 1), 2x2 max pool, ReLU, flattened (as Mena et al. 2018).
The tile features go into a lattice ``setperm.PermutationOptimization`` (section 2.4, ``grid=(n, n)``,
two cost channels: row-wise and column-wise), and the soft permutation is applied to the *raw* tiles.

Variants (paper Table 1): ``linassign`` (Mena et al.: per-tile linear map to the N positions, Sinkhorn;
PO-LA with T = 0), ``po-u`` (uniform start, T = 4), ``po-la`` (linear-assignment start, T = 4).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

import setperm

from .tiles import assemble

PERMUTATIONS = ("linassign", "po-u", "po-la")


class TileEncoder(nn.Module):
    """tiles (B, N, C, h, w) -> features (B, N, channels * (h//2) * (w//2))."""

    def __init__(self, in_channels: int, tile_size: int, channels: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.out_features = channels * (tile_size // 2) ** 2
        nn.init.xavier_uniform_(self.conv.weight)  # paper F: Xavier initialisation
        nn.init.zeros_(self.conv.bias)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        b, n = tiles.shape[:2]
        y = torch.relu(self.pool(self.conv(tiles.flatten(0, 1))))
        return y.reshape(b, n, -1)


class MosaicNet(nn.Module):
    """forward(shuffled (B, N, C, h, w)) -> (reconstruction (B, N, C, h, w), P (B, N, N)).

    ``P[b, i, k]`` = weight of input tile i at grid position k = r*n + c; reconstruction = P^T tiles.
    """

    def __init__(self, n: int, in_channels: int, tile_size: int, permutation: str = "po-u", *, steps: int = 4,
                 conv_channels: int = 64, cost_hidden: int = 64, logit_clip: Optional[float] = None,
                 sinkhorn_iters: int = 4, temperature: float = 1.0, kernel: str = "auto"):
        super().__init__()
        if permutation not in PERMUTATIONS:
            raise ValueError(f"permutation: expected one of {PERMUTATIONS}, got {permutation!r}")
        self.n, self.variant = n, permutation
        self.encoder = TileEncoder(in_channels, tile_size, conv_channels)
        N = n * n
        if permutation == "linassign":
            self.po = setperm.LinAssign(self.encoder.out_features, N, sinkhorn_iters=sinkhorn_iters,
                                        temperature=temperature, logit_clip=logit_clip, grid=(n, n))
        else:
            self.po = setperm.PermutationOptimization(
                self.encoder.out_features, cost_hidden=cost_hidden, steps=steps, permutation=permutation,
                num_positions=None if permutation == "po-u" else N, sinkhorn_iters=sinkhorn_iters,
                temperature=temperature, logit_clip=logit_clip, grid=(n, n), kernel=kernel)

    def permutation(self, shuffled: torch.Tensor, return_steps: bool = False):
        """P (B, N, N), or the list of the T+1 soft permutations S(P~(0)), ..., S(P~(T)) for figures."""
        if shuffled.dim() != 5 or shuffled.shape[1] != self.n * self.n:
            raise ValueError(f"shuffled: expected (B, {self.n * self.n}, C, h, w), got shape {tuple(shuffled.shape)}")
        return self.po(self.encoder(shuffled), return_steps=return_steps)

    def forward(self, shuffled: torch.Tensor):
        P = self.permutation(shuffled)
        return setperm.functional.apply_permutation(shuffled, P), P


class ClassifyNet(nn.Module):
    """Implicit task (section 4.3, F.3): MosaicNet, then the frozen pre-trained classifier on the assembled image.

    forward(shuffled (B, N, C, h, w)) -> (logits (B, classes), reconstruction (B, N, C, h, w), P (B, N, N)).
    Only ``self.mosaic`` is trained; the classifier's parameters are frozen and it stays in eval mode
    (batch-norm statistics of the pre-trained network are kept as they are).
    """

    def __init__(self, mosaic: MosaicNet, classifier: nn.Module):
        super().__init__()
        self.mosaic = mosaic
        self.classifier = classifier
        for p in self.classifier.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.classifier.eval()
        return self

    def forward(self, shuffled: torch.Tensor):
        recon, P = self.mosaic(shuffled)
        return self.classifier(assemble(recon, self.mosaic.n)), recon, P
