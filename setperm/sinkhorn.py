"""The Sinkhorn operator (paper appendix B, eq. 11-15) in the log domain, with masking."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .masking import assignment_mask


def sinkhorn(logits: Tensor, mask: Optional[Tensor] = None, iters: int = 4, temperature: float = 1.0) -> Tensor:
    """Normalise ``exp(logits / temperature)`` towards a doubly-stochastic matrix.

    Args:
        logits: ``(B, N, N)`` unnormalised assignment P~; rows = elements, columns = positions.
        mask: ``(B, N)`` bool, True = real element, or None.
        iters: number L of (row, column) normalisation rounds; the paper fixes L = 4 (appendix B).
        temperature: divides the logits before exponentiation (Mena et al., 2018).

    Returns:
        ``(B, N, N)`` P = S(P~) in the dtype of ``logits``. Each round normalises rows then
        columns (eq. 14), so columns sum to 1 exactly and rows approximately. With a mask, the
        real elements are assigned among the first n positions only and the j-th padded element
        is fixed to position n + j (one-hot), so the real block equals the unpadded result.

    Computed in the log domain (``logsumexp``), so it is finite for any finite input, and in at
    least float32 under autocast or for half inputs.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[1] != logits.shape[2]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape (B, N, N), got {got}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out_dtype = logits.dtype
    compute_dtype = torch.promote_types(out_dtype, torch.float32)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        z = logits.to(compute_dtype)
        if temperature != 1.0:
            z = z / temperature
        if mask is not None:
            allowed = assignment_mask(mask)
            z = torch.where(allowed, z, torch.full((), float("-inf"), dtype=z.dtype, device=z.device))
        # S^(0) = exp(X); in the log domain the exponentiation is implicit.
        for _ in range(iters):
            z = z - torch.logsumexp(z, dim=2, keepdim=True)   # T_r: rows (over positions) sum to 1
            z = z - torch.logsumexp(z, dim=1, keepdim=True)   # T_c: columns (over elements) sum to 1
        return z.exp().to(out_dtype)
