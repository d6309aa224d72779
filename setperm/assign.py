"""Using a permutation: apply it, harden it (Hungarian), and the linear-assignment logits.

Convention (everywhere in setperm): ``P[b, i, k]`` is the weight of element ``i`` at position
``k``; the permuted sequence is ``y = P^T x``, ``y[b, k] = sum_i P[b, i, k] x[b, i]``.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn


def apply_permutation(x: Tensor, P: Tensor) -> Tensor:
    """Permute the elements of ``x`` with ``P``.

    Args:
        x: ``(B, N, ...)`` elements (any trailing dims, e.g. tiles ``(B, N, C, h, w)``).
        P: ``(B, N, N)`` soft or hard permutation, rows = elements, columns = positions.
    Returns:
        ``y`` ``(B, N, ...)`` with ``y[b, k] = sum_i P[b, i, k] * x[b, i]``; one batched matmul,
        no ``(B, N, N, ...)`` broadcast.
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must have shape (B, N, ...), got {tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
    if P.dim() != 3 or P.shape[1] != P.shape[2] or P.shape[0] != x.shape[0] or P.shape[1] != x.shape[1]:
        raise ValueError(f"P must have shape (B, N, N) = {(x.shape[0], x.shape[1], x.shape[1])} to match x "
                         f"{tuple(x.shape)}, got {tuple(P.shape)}")
    B, N = x.shape[:2]
    flat = x.reshape(B, N, -1)
    y = P.transpose(1, 2).to(flat.dtype) @ flat
    return y.reshape(x.shape)


def hungarian(P: Tensor, mask: Optional[Tensor] = None,
              return_matrix: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Hard permutation closest to ``P``: ``scipy.optimize.linear_sum_assignment`` on ``-P`` per set.

    Args:
        P: ``(B, N, N)`` soft permutation (rows = elements, columns = positions).
        mask: ``(B, N)`` bool, True = real element. Only the real block (real elements x first n
            positions) is solved; padded elements keep the trailing positions in input order.
        return_matrix: also return the hard permutation matrix.
    Returns:
        ``idx`` ``(B, N)`` long with ``idx[b, k]`` = the element placed at position ``k`` (so
        ``x[b, idx[b]]`` is the hard-permuted set); with ``return_matrix`` also ``P_hard``
        ``(B, N, N)`` (dtype of P) with ``P_hard[b, idx[b, k], k] = 1``.

    Runs on the CPU (O(N^3) per set); the result is moved back to ``P``'s device.
    """
    if not isinstance(P, Tensor) or P.dim() != 3 or P.shape[1] != P.shape[2]:
        raise ValueError(f"P must have shape (B, N, N), got {tuple(P.shape) if isinstance(P, Tensor) else type(P)}")
    B, N, _ = P.shape
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (B, N)):
        raise ValueError(f"mask must be a bool tensor of shape {(B, N)}, got {mask.dtype} {tuple(mask.shape)}")
    Pn = P.detach().to("cpu", torch.float64).numpy()
    mn = None if mask is None else mask.detach().cpu().numpy()
    idx = np.empty((B, N), dtype=np.int64)
    for b in range(B):
        if mn is None:
            real = np.arange(N)
            pads = np.empty(0, dtype=np.int64)
        else:
            real = np.flatnonzero(mn[b])
            pads = np.flatnonzero(~mn[b])
        n = len(real)
        if n:
            if not np.all(np.isfinite(Pn[b][np.ix_(real, np.arange(n))])):
                raise ValueError(f"P has non-finite entries in the real block of set {b}")
            rows, cols = linear_sum_assignment(-Pn[b][np.ix_(real, np.arange(n))])
            idx[b, cols] = real[rows]
        idx[b, n:] = pads
    idx_t = torch.from_numpy(idx).to(P.device)
    if not return_matrix:
        return idx_t
    hard = torch.zeros_like(P)
    hard.scatter_(1, idx_t.unsqueeze(1), 1.0)        # hard[b, idx[b, k], k] = 1
    return idx_t, hard


def permutation_matrix(idx: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Matrix form ``(B, N, N)`` of an index permutation ``idx[b, k]`` = element at position ``k``."""
    B, N = idx.shape
    out = torch.zeros(B, N, N, dtype=dtype, device=idx.device)
    return out.scatter_(1, idx.unsqueeze(1), 1.0)


def linear_assignment_logits(x: Tensor, weight: Tensor, clip: Optional[float] = None) -> Tensor:
    """Eq. 6 (right): ``P~_ik = w_k . x_i`` for ``x`` (B, N, D) and ``weight`` (M >= N, D) -> (B, N, N).

    Uses the first N position vectors, so a padded batch of size N assigns its real elements with
    the weights of the first n positions. ``clip`` bounds the logits to ``[-clip, clip]`` (paper
    F.3 clips LinAssign to [-10, 10] to avoid NaN in the non-log Sinkhorn).
    """
    N = x.shape[1]
    if weight.shape[0] < N:
        raise ValueError(f"linear assignment has {weight.shape[0]} positions but the set has N={N} elements "
                         f"(x shape {tuple(x.shape)}); build it with num_positions >= N")
    logits = x @ weight[:N].t()
    if clip is not None:
        logits = logits.clamp(-clip, clip)
    return logits


class LinearAssignment(nn.Module):
    """Per-element linear map to ``num_positions`` logits (Mena et al. 2018; PO-LA init, eq. 6).

    Shapes: ``forward(x (B, N, D)) -> logits (B, N, N)`` with ``N <= num_positions``.
    """

    def __init__(self, in_features: int, num_positions: int, clip: Optional[float] = None):
        super().__init__()
        if num_positions < 1:
            raise ValueError(f"num_positions must be >= 1, got {num_positions}")
        self.num_positions = num_positions
        self.clip = clip
        self.weight = nn.Parameter(torch.empty(num_positions, in_features))
        nn.init.xavier_uniform_(self.weight)   # paper F: Xavier init; the released code has no bias

    def forward(self, x: Tensor) -> Tensor:
        return linear_assignment_logits(x, self.weight, self.clip)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, num_positions={self.num_positions}, clip={self.clip}"
