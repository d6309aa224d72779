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
        return _LogSinkhorn.apply(z, iters).to(out_dtype)


def _normalise_log(z: Tensor, dim: int) -> Tensor:
    """One log-domain normalisation (eq. 11 or 12): ``z - logsumexp(z, dim)``."""
    return z - torch.logsumexp(z, dim=dim, keepdim=True)


def _plain_iterates(z: Tensor, iters: int, keep: bool):
    """The same operator in the plain domain (a sum and a division per half-step instead of a
    logsumexp): ``exp(z - rowmax)`` then alternating row/column normalisations; the first row
    normalisation of ``exp(z - rowmax)`` equals that of ``exp(z)``, so every iterate is the
    log-domain one. Returns the list of half-step outputs (``keep``) or the last one, or None if a
    row or column sum fell below ``tiny / eps`` (underflow would lose accuracy or divide by zero):
    the caller then uses the log domain, which is finite for any finite input."""
    finfo = torch.finfo(z.dtype)
    floor = finfo.tiny / finfo.eps
    x = torch.exp(z - z.amax(dim=2, keepdim=True))                       # row maxima become 1
    outs = []
    smallest = None
    for d in [2, 1] * iters:
        s = x.sum(dim=d, keepdim=True)
        m = s.amin()
        smallest = m if smallest is None else torch.minimum(smallest, m)
        x = x / s
        if keep:
            outs.append(x)
    # One host synchronisation per call (not one per half-step): on a GPU each sync stalls the queue.
    # Once a sum underflows to 0 the later iterates are NaN, and NaN propagates through minimum, so
    # "not >= floor" catches both.
    if not bool(smallest >= floor):
        return None
    return outs if keep else x


class _LogSinkhorn(torch.autograd.Function):
    """``exp`` of ``iters`` alternating row/column log-normalisations of ``z`` (eq. 13-15).

    Computed in the plain domain when no row or column sum underflows (the common case, ~3x
    cheaper), else in the log domain. Saves only the input and the output; backward recomputes the
    iterates of this one call and applies the exact derivative of each normalisation,
    ``dz = dy - softmax(z, dim) * sum(dy, dim)`` with ``softmax(z, dim) = exp(y)`` = the normalised
    iterate. Autograd memory is 2 ``(B, N, N)`` tensors per call instead of ~2 per half-step, and
    the backward is differentiable (double backward).
    """

    @staticmethod
    def forward(ctx, z: Tensor, iters: int) -> Tensor:
        P = _plain_iterates(z, iters, keep=False) if iters > 0 else None
        ctx.plain = P is not None
        if P is None:
            # S^(0) = exp(X); in the log domain the exponentiation is implicit.
            y = z
            for _ in range(iters):
                y = _normalise_log(y, 2)     # T_r: rows (over positions) sum to 1
                y = _normalise_log(y, 1)     # T_c: columns (over elements) sum to 1
            P = y.exp()
        ctx.iters = iters
        ctx.save_for_backward(z, P)
        return P

    @staticmethod
    def backward(ctx, grad_P: Tensor):
        z, P = ctx.saved_tensors
        dims = [2, 1] * ctx.iters
        # Recompute the softmax of every half-step (its normalised output); the last one is P.
        softmaxes = _plain_iterates(z, ctx.iters, keep=True)[:-1] if ctx.plain else None
        if softmaxes is None:
            softmaxes = []
            y = z
            for d in dims[:-1]:
                y = _normalise_log(y, d)
                softmaxes.append(y.exp())
        softmaxes = softmaxes[:len(dims) - 1] + [P]
        g = grad_P * P                                                   # through exp
        for d, S in zip(reversed(dims), reversed(softmaxes)):
            g = g - S * g.sum(dim=d, keepdim=True)                       # through z - logsumexp(z, d)
        return g, None
