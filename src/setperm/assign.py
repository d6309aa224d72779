"""Using a permutation: apply it, harden it (Hungarian), and the linear-assignment logits.

Convention (everywhere in setperm): ``P[b, i, k]`` is the weight of element ``i`` at position
``k``; the permuted sequence is ``y = P^T x``, ``y[b, k] = sum_i P[b, i, k] x[b, i]``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ._errors import check_int, check_positive, check_same_device
from .masking import check_set, host_decisions, resolve_mask
from .scale import set_scale


def apply_permutation(x: Tensor, P: Tensor) -> Tensor:
    """Permute the elements of ``x`` with ``P``.

    Args:
        x: ``(B, N, ...)`` elements (any trailing dims, e.g. tiles ``(B, N, C, h, w)``).
        P: ``(B, N, N)`` soft or hard permutation, rows = elements, columns = positions.
    Returns:
        ``y`` ``(B, N, ...)`` with ``y[b, k] = sum_i P[b, i, k] * x[b, i]``; one batched matmul,
        no ``(B, N, N, ...)`` broadcast. Empty inputs (B = 0 or N = 0) give an empty ``y``. In
        ``x``'s dtype, or for integer or bool ``x`` in ``P``'s floating dtype (a soft ``P``
        averages elements; ``P`` cast to integers would lose every weight below 1). Padding in
        ``x`` must be finite (zero it with ``mask``): its weight in ``P`` is 0, but 0 * NaN is NaN,
        so NaN or inf there would reach every position of its set (the modules zero it first).
    """
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"x must have shape (B, N, ...), got {tuple(x.shape) if isinstance(x, Tensor) else type(x)}")
    if not isinstance(P, Tensor) or P.dim() != 3 or P.shape[1] != P.shape[2] or P.shape[0] != x.shape[0] \
            or P.shape[1] != x.shape[1]:
        got = tuple(P.shape) if isinstance(P, Tensor) else type(P).__name__
        raise ValueError(f"P must have shape (B, N, N) = {(x.shape[0], x.shape[1], x.shape[1])} to match x "
                         f"{tuple(x.shape)}, got {got}")
    # checked by device: a product of a meta P with a CPU x returns uninitialised CPU memory
    check_same_device(P, "P", x, "x")
    B, N = x.shape[:2]
    flat = x.reshape(B, N, math.prod(x.shape[2:]))    # explicit size: -1 is ambiguous for empty x
    if not flat.is_floating_point() and not flat.is_complex():
        flat = flat.to(P.dtype if P.is_floating_point() else torch.get_default_dtype())
    y = P.transpose(1, 2).to(flat.dtype) @ flat
    return y.reshape(x.shape)


def hungarian(P: Tensor, mask: Optional[Tensor] = None, *, return_matrix: bool = False,
              lengths: Optional[Tensor] = None,
              key_padding_mask: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Hard permutation closest to ``P``: ``scipy.optimize.linear_sum_assignment`` on ``-P`` per set.

    Args:
        P: ``(B, N, N)`` soft permutation (rows = elements, columns = positions).
        mask: ``(B, N)`` bool, True = real element (or ``lengths`` ``(B,)``, or
            ``key_padding_mask`` ``(B, N)`` with True = padding; at most one). Only the real block
            (real elements x first n positions) is solved; padded elements keep the trailing
            positions in input order.
        return_matrix: also return the hard permutation matrix.
    Returns:
        ``idx`` ``(B, N)`` long with ``idx[b, k]`` = the element placed at position ``k`` (so
        ``x[b, idx[b]]`` is the hard-permuted set); with ``return_matrix`` also ``P_hard``
        ``(B, N, N)`` (dtype of P) with ``P_hard[b, idx[b, k], k] = 1``.

    Runs on the CPU (O(N^3) per set); the result is moved back to ``P``'s device.
    """
    if not isinstance(P, Tensor) or P.dim() != 3 or P.shape[1] != P.shape[2]:
        raise ValueError(f"P must have shape (B, N, N), got {tuple(P.shape) if isinstance(P, Tensor) else type(P)}")
    if P.is_complex():
        # the float64 copy below would drop the imaginary part with only a warning
        raise ValueError(f"P must be a real tensor of assignment weights, got dtype {P.dtype}")
    if P.device.type == "meta":
        raise ValueError("P is on the meta device, which holds no values to solve an assignment on")
    B, N, _ = P.shape
    mask = resolve_mask(P, mask, lengths, key_padding_mask, name="P")
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
    """Matrix form ``(B, N, N)`` of an index permutation ``idx`` ``(B, N)``, ``idx[b, k]`` = element at
    position ``k`` (as :func:`hungarian` returns it): ``out[b, idx[b, k], k] = 1``.

    On the CPU each row is checked to be a permutation of ``0 .. N-1`` (a repeated or out-of-range
    index is a ValueError naming the row); on other devices the check would wait for the device,
    so it is not made there (an index out of range is then the device's own error)."""
    if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.is_floating_point() or idx.is_complex() \
            or idx.dtype == torch.bool:
        got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx).__name__
        raise ValueError(f"idx must be an integer tensor of shape (B, N), got {got}")
    B, N = idx.shape
    if host_decisions(idx) and idx.numel():
        bad = (idx.sort(1).values != torch.arange(N, dtype=idx.dtype)).any(1).nonzero()
        if bad.numel():
            b = int(bad[0])
            raise ValueError(f"idx must hold a permutation of 0..{N - 1} in each row, row {b} is {idx[b].tolist()}")
    out = torch.zeros(B, N, N, dtype=dtype, device=idx.device)
    return out.scatter_(1, idx.long().unsqueeze(1), 1.0)


def linear_assignment_logits(x: Tensor, weight: Tensor, clip: Optional[float] = None) -> Tensor:
    """Eq. 6 (right): ``P~_ik = w_k . x_i`` for ``x`` (B, N, D) and ``weight`` (M >= N, D) -> (B, N, N).

    Uses the first N position vectors, so a padded batch of size N assigns its real elements with
    the weights of the first n positions. ``clip`` bounds the logits to ``[-clip, clip]`` (paper
    F.3 clips LinAssign to [-10, 10] to avoid NaN in the non-log Sinkhorn).

    Computed as ``s * ((x / s) @ W^T)`` with a power of two ``s`` per element (:func:`set_scale`
    of each element alone): bitwise the plain product for ordinary elements; each row independent
    of the other elements (a huge padded element does not scale its neighbours into subnormals);
    and for huge elements an overflow gives ``+-inf`` logits (which
    :func:`setperm.functional.sinkhorn` accepts) instead of NaN from ``inf - inf``.
    """
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape (M, D), got {got}")
    check_set(x, features=weight.shape[1])
    check_same_device(weight, "weight", x, "x")
    N = x.shape[1]
    if weight.shape[0] < N:
        raise ValueError(f"linear assignment has {weight.shape[0]} positions but the set has N={N} elements "
                         f"(x shape {tuple(x.shape)}); build it with num_positions >= N")
    B, _, D = x.shape
    scale = set_scale(x.reshape(B * N, 1, D)).view(B, N, 1)
    logits = ((x / scale) @ weight[:N].t()) * scale
    if clip is not None:
        logits = logits.clamp(-clip, clip)
    return logits


class LinearAssignmentLogits(nn.Module):
    """The logits of eq. 6 (right): a per-element linear map to ``num_positions`` position scores,
    ``P~_ik = w_k . x_i`` (Mena et al. 2018). The PO-LA start and the LinAssign baseline are these
    logits followed by the optimisation / Sinkhorn (:class:`setperm.PermutationOptimization`).

    Args:
        in_features: element dimension D.
        num_positions: number M of position vectors; sets may have any N <= M.
        clip: bound the logits to ``[-clip, clip]`` (paper F.3 uses 10), or None.
        device, dtype: where and in which dtype to create the weight.

    Shapes: ``forward(x (B, N, D)) -> logits (B, N, N)`` with ``N <= num_positions``.
    """

    def __init__(self, in_features: int, num_positions: int, clip: Optional[float] = None, *,
                 device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        in_features = check_int(in_features, "in_features", 1)
        num_positions = check_int(num_positions, "num_positions", 1)
        if clip is not None:
            clip = check_positive(clip, "clip")
        self.in_features = in_features
        self.num_positions = num_positions
        self.clip = clip
        self.weight = nn.Parameter(torch.empty(num_positions, in_features, **factory_kwargs))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)   # paper F: Xavier init; the released code has no bias

    def forward(self, x: Tensor) -> Tensor:
        return linear_assignment_logits(x, self.weight, self.clip)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_positions={self.num_positions}, clip={self.clip}"
