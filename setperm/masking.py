"""Validation of the public inputs and the one mask convention of the package.

``mask`` is a ``(B, N)`` bool tensor, **True = real element**. Variable-size sets are padded to a
common ``N``; ``lengths`` ``(B,)`` may be given instead when the real elements are a prefix.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def check_set(x: Tensor, name: str = "x", *, min_dim: int = 3, max_dim: Optional[int] = 3,
              features: Optional[int] = None) -> None:
    """``x`` must be a floating tensor of shape ``(B, N, D)`` (or more trailing dims if allowed),
    with ``D == features`` when given."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim or (max_dim is not None and x.dim() > max_dim):
        want = "(B, N, D)" if max_dim == 3 else "(B, N, ...)"
        raise ValueError(f"{name} must have shape {want}, got shape {_shape(x)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if features is not None and x.shape[-1] != features:
        raise ValueError(f"{name} must have {features} features in its last dim, got shape {_shape(x)}")


def resolve_mask(x: Tensor, mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None) -> Optional[Tensor]:
    """Check ``mask`` / ``lengths`` against ``x`` (B, N, ...) and return a ``(B, N)`` bool mask or None.

    None means every element is real. ``lengths`` is converted to a prefix mask.
    """
    B, N = x.shape[0], x.shape[1]
    if mask is not None and lengths is not None:
        raise ValueError("pass either mask or lengths, not both")
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = real element), got dtype {mask.dtype}")
        if tuple(mask.shape) != (B, N):
            raise ValueError(f"mask must have shape (B, N) = {(B, N)} to match x {_shape(x)}, got shape {_shape(mask)}")
        return mask.to(x.device)
    if lengths is not None:
        if not isinstance(lengths, Tensor):
            lengths = torch.as_tensor(lengths)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
            raise ValueError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must have shape (B,) = {(B,)} to match x {_shape(x)}, got shape {_shape(lengths)}")
        if B and (int(lengths.min()) < 0 or int(lengths.max()) > N):
            raise ValueError(f"lengths must lie in [0, N={N}], got min {int(lengths.min())} and max {int(lengths.max())}")
        return torch.arange(N, device=x.device) < lengths.to(x.device).unsqueeze(1)
    return None


def check_weights(x: Tensor, weights: Optional[Tensor]) -> None:
    if weights is None:
        return
    if not isinstance(weights, Tensor) or not weights.is_floating_point():
        got = weights.dtype if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a floating-point tensor of relevance logits, got {got}")
    if tuple(weights.shape) != tuple(x.shape[:2]):
        raise ValueError(f"weights must have shape (B, N) = {tuple(x.shape[:2])} to match x {_shape(x)}, "
                         f"got shape {_shape(weights)}")


def check_finite(x: Tensor, mask: Optional[Tensor], name: str = "x") -> None:
    """Raise if a *real* element of ``x`` holds NaN/Inf (padded elements may hold anything).

    Costs one reduction over ``x`` and one host synchronisation; turn off with ``check_finite=False``.
    """
    bad = ~torch.isfinite(x)
    if mask is not None:
        bad = bad & mask.view(mask.shape + (1,) * (x.dim() - 2))
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        raise ValueError(f"{name} has a non-finite value at a real element, index {tuple(idx)} of shape {_shape(x)} "
                         f"(mask it out, or pass check_finite=False to skip this check)")


def zero_padding(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Replace padded elements by zeros with ``where`` (not a product), so -inf/NaN padding never
    reaches arithmetic and receives no gradient."""
    if mask is None:
        return x
    m = mask.view(mask.shape + (1,) * (x.dim() - 2))
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def assignment_mask(mask: Tensor) -> Tensor:
    """The ``(B, N, N)`` set of allowed (element i, position k) pairs for a padded batch.

    Real elements may go to the first ``n`` positions (n = number of real elements); the j-th
    padded element (in input order) is pinned to position ``n + j``. Every row and column then
    has at least one allowed entry, so the log-domain Sinkhorn never sees an all ``-inf`` line,
    and the real block is normalised exactly as the unpadded set would be.
    """
    B, N = mask.shape
    n = mask.sum(1, keepdim=True)                                   # (B, 1)
    pos = torch.arange(N, device=mask.device)
    real_pos = pos.unsqueeze(0) < n                                 # (B, N) positions used by real elements
    pad_rank = torch.cumsum(~mask, dim=1) - 1                       # rank of each padded element among pads
    pad_target = n + pad_rank                                       # (B, N) its fixed position
    allowed_real = mask.unsqueeze(2) & real_pos.unsqueeze(1)
    allowed_pad = (~mask).unsqueeze(2) & (pos.view(1, 1, N) == pad_target.unsqueeze(2))
    return allowed_real | allowed_pad


def pair_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """``(B, N, N)``: True where both elements are real."""
    if mask is None:
        return None
    return mask.unsqueeze(2) & mask.unsqueeze(1)
