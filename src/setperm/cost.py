"""Pairwise anti-symmetric ordering cost (paper section 2.3, eq. 8-10).

``C_ij = F(x_i, x_j) = f(x_i, x_j) - f(x_j, x_i)`` with ``f`` a small MLP on the concatenated
pair ``[x_i; x_j]``, then ``C / ||C||_F`` per set and per cost channel.

Two facts make this cheap:
- the first layer of ``f`` on ``[x_i; x_j]`` is ``W_a x_i + W_b x_j + b``: the two projections are
  computed once per element and broadcast, the ``(B, N, N, 2D)`` pairs are never built;
- ``g_ij = f(x_i, x_j)`` is evaluated once and ``C = g - g^T``; ``f`` is not run twice.
For the common two-layer ``f`` a custom autograd function (:mod:`setperm.pairwise`) evaluates
``g`` and recomputes the ``(B, N, N, hidden)`` activations in backward instead of storing them, so
memory grows as ``N^2 * K`` rather than ``N^2 * hidden``; it recomputes the two projections as
well, so that backward keeps the ``(B, N, D)`` elements, not two ``(B, N, hidden)`` tensors. The
projections are computed with autocast off (in the wider dtype of ``x`` and the weights; they cost
``B N D hidden`` multiply-adds, nothing beside the pairs' ``B N^2 hidden``), so that the ones
backward recomputes are the forward's, bit for bit.

What follows ``g`` (``g - g^T``, the zeros of equal elements and of padded pairs, eq. 10) is one
pure function with a closed-form backward (:func:`_cost_tail`, :func:`_cost_tail_grad`): about 30
operations forward and 10 backward as plain operations, a few fused loops each when the compiled
kernel runs it (on CUDA by default: each operation there is a kernel launch). For the two-layer ``f``
the compiled kernel runs the pairwise MLP and this tail as one compiled function each way
(:class:`_TwoLayerCost`); a deeper ``f`` is plain operations followed by :class:`_CostTail`.
"""
from __future__ import annotations

import numbers
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ._compat import is_compiling, signature_kept
from ._errors import check_int, check_same_device, registered_hooks, user_stacklevel
from .init import uninitialized, xavier_linear_
from .masking import (check_dtype, check_module_device, check_set, host_decisions, pair_mask, resolve_mask,
                      zero_padding)
from .pairwise import (_call_compiled, _fused_backward, _fused_forward, _rows_per_chunk, _two_layer_backward,
                       _two_layer_forward, check_kernel, element_projections, kernel_to_call, pairwise_two_layer)
from .scale import set_scale


def _hash_words(x: Tensor) -> Optional[Tensor]:
    """``(B, N, W)`` int64: each element's bit pattern as non-negative words (``-0.0`` mapped to
    ``+0.0``, since ``-0.0 == 0.0``), or None for a dtype without a plain bit view (complex, fp8)."""
    size = x.element_size()
    if size not in (2, 4, 8) or x.is_complex():
        return None
    word = torch.int16 if size == 2 else torch.int32
    bits = (x.detach() + 0.0).contiguous().view(word).to(torch.int64)    # + 0.0 maps -0.0 to +0.0
    return bits & (0xFFFF if size == 2 else 0xFFFFFFFF)


def _equal_pairs_by_hash(x: Tensor, mask: Optional[Tensor] = None) -> Optional[Tensor]:
    """:func:`equal_pairs` in O(B N D + B N^2) when no two distinct elements of a set collide.

    Each element's bit pattern gets an exact integer hash (no rounding: 32-bit words times 20-bit
    weights, summed in int64 without overflow). Equal elements have equal hashes, so if no
    off-diagonal pair of hashes is equal the only equal pairs are the diagonal ones (``x_i == x_i``,
    False only with NaN). Returns None (caller compares element-wise) on a hash collision or an
    unsupported dtype/size. Deciding that needs one host synchronisation. With ``mask``, pairs
    with a padded element are not tested (and come out False): zeroed padding is a run of equal
    elements, which would otherwise send every padded batch to the element-wise comparison.
    """
    B, N, D = x.shape
    bits = _hash_words(x)
    if bits is None or bits.shape[-1] > 2048:
        return None
    words = bits.shape[-1]
    weights = (torch.arange(1, words + 1, device=x.device, dtype=torch.int64) * 0x9E3B5) % (1 << 20) + 1
    h = (bits * weights).sum(-1)                                         # (B, N), exact
    same = h.unsqueeze(2) == h.unsqueeze(1)
    eye = torch.eye(N, dtype=torch.bool, device=x.device)
    collide = same & ~eye
    if mask is not None:
        collide = collide & pair_mask(mask)
    if bool(collide.any()):
        return None
    return eye & (x == x).all(-1).unsqueeze(2)


def _equal_pairs_on_device(x: Tensor) -> Optional[Tensor]:
    """:func:`equal_pairs` without a host synchronisation or a data-dependent branch (for CUDA and
    for tracing by ``torch.compile``): ``x_i`` and ``x_j`` are bitwise equal exactly when the
    squared distance of their bit patterns, read as 16-bit integers (``-0.0`` mapped to ``+0.0``),
    is 0. With digits of magnitude at most ``2^15`` every product and every partial sum of
    ``|b_i|^2 + |b_j|^2 - 2 b_i . b_j`` is an integer below ``2^53`` (for up to ``2^20`` digits), so
    float64 products compute it exactly, in any summation order (autocast leaves float64 alone).
    None for dtypes without a bit view of 16-bit digits or too many digits."""
    if x.is_complex() or x.element_size() not in (2, 4, 8) or x.shape[-1] * x.element_size() // 2 > (1 << 20):
        return None
    d = (x.detach() + 0.0).contiguous().view(torch.int16).to(torch.float64)       # + 0.0 maps -0.0 to +0.0
    sq = (d * d).sum(-1)                                                 # (B, N), exact
    dist = torch.baddbmm(sq.unsqueeze(2) + sq.unsqueeze(1), d, d.transpose(1, 2), alpha=-2)
    # bitwise-equal elements with a NaN are not equal (x == x is False), as in the element-wise test
    return (dist == 0) & (x == x).all(-1).unsqueeze(2)


def equal_pairs(x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """``(B, N, N)`` bool: True where ``x_i`` and ``x_j`` are bitwise identical elements; with a
    ``mask`` ``(B, N)`` (True = real), exact on pairs of real elements only (a pair with a padded
    element may come out either way: the cost is zero there whatever it says).

    ``F(x, x) = 0`` exactly in eq. 8, but batched matmuls may round identical rows differently,
    and the normalisation of eq. 10 would blow that noise up to unit norm when *all* elements are
    identical. Pinning these costs to 0 keeps the maths exact (the uniform assignment results).
    On the CPU: a hash test, with a row-chunked element-wise comparison (the ``(B, r, N, D)``
    comparison stays bounded) on a collision; elsewhere and under ``torch.compile``: the same
    answer from an exact matmul of bit patterns, with no host synchronisation; under
    ``torch.compile``, the element-wise test, fused by the compiler.
    """
    B, N, D = x.shape
    if is_compiling():
        # the element-wise test, which the compiler fuses into one loop over (i, j, d) that never
        # stores the (B, N, N, D) comparison
        return (x.unsqueeze(2) == x.unsqueeze(1)).all(-1)
    if not host_decisions(x):
        exact = _equal_pairs_on_device(x)
        if exact is not None:
            return exact
    else:
        fast = _equal_pairs_by_hash(x, mask)
        if fast is not None:
            return fast
    out = torch.empty(B, N, N, dtype=torch.bool, device=x.device)
    step = _rows_per_chunk(B, N, D)
    for i0 in range(0, N, step):
        i1 = min(N, i0 + step)
        out[:, i0:i1] = (x[:, i0:i1, None, :] == x[:, None, :, :]).all(-1)
    return out


# eq. 10's floor of the Frobenius norm (a cost below it is divided by it instead)
NORM_EPS = 1e-12


def normalize_cost(C: Tensor, mask: Optional[Tensor] = None, eps: float = NORM_EPS) -> Tensor:
    """Eq. 10: divide each set's and channel's cost ``(B, K, N, N)`` by its Frobenius norm.

    Padded pairs are zero and so do not enter the norm. Computed as ``(C / m) / ||C / m||`` with
    ``m = max |C_ij|`` (not differentiated: the result does not depend on it), so neither squaring
    nor the norm can overflow for any finite ``C``. A zero cost (identical elements) stays
    zero: the norm is clamped at ``eps``, which keeps both the value and the gradient finite.
    Backward is in closed form (:class:`_UnitNorm`): it keeps the result, not ``C / m`` beside it.
    """
    if C.numel() == 0:
        return C
    return _UnitNorm.apply(C, float(eps))[0]


def _unit_norm(C: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eq. 10's values: ``y = u / n`` with ``u = C / m``, ``m = max |C|`` per set and channel (clamped
    at ``eps``, a constant) and ``n = sqrt(max(||u||^2, 1))``; returns ``y, n, m`` and where the clamp
    at 1 passes the gradient on (``||u||^2 >= 1``)."""
    m = C.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(max(eps, torch.finfo(C.dtype).tiny))
    # sum((C / m)^2) >= 1 whenever max |C| >= eps (its largest entry is exactly +-1), so the clamp
    # at 1 only acts below eps, where it gives the norm eps as before.
    unit = C / m
    sq = unit.pow(2).sum(dim=(-2, -1), keepdim=True)
    n = sq.clamp_min(1.0).sqrt()
    # (not C / (m * n): that product may overflow)
    return unit / n, n, m, sq >= 1.0


def _unit_norm_grad(y: Tensor, n: Tensor, m: Tensor, active: Tensor, g: Optional[Tensor],
                    g_n: Optional[Tensor]) -> Optional[Tensor]:
    """``dL/dC`` of :func:`_unit_norm` in closed form from its outputs,

        dL/dC = (g - a y (<y, g> - n g_n)) / (n m),   a = 1[||u||^2 >= 1]

    (``g``, ``g_n``: the gradients of ``y`` and ``n``, either may be None; ``a`` as ``clamp_min``'s
    derivative): 7 operations instead of the chain's 17 or so, and no ``u`` kept beside ``y``."""
    if g is None and g_n is None:
        return None
    s = (y * g).sum(dim=(-2, -1), keepdim=True) if g is not None else 0.0
    if g_n is not None:
        s = s - n * g_n
    along = y * torch.where(active, s, 0.0)
    return (-along if g is None else g - along) / (n * m)


class _UnitNorm(torch.autograd.Function):
    """:func:`_unit_norm` with its closed-form backward (:func:`_unit_norm_grad`), which needs only
    ``y``, ``n``, ``m`` and the clamp's activity. ``n`` is an output too (the caller drops it), so
    that a differentiated backward (``create_graph=True``) reaches ``C`` through ``n`` as well as ``y``."""

    @staticmethod
    @signature_kept
    def forward(C: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        return _unit_norm(C, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        y, n, m, active = output
        ctx.mark_non_differentiable(m, active)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y, n, m, active)

    @staticmethod
    def backward(ctx, g: Optional[Tensor], g_n: Optional[Tensor], _g_m: None, _g_active: None):
        return _unit_norm_grad(*ctx.saved_tensors, g, g_n), None


def _antisymmetric(g: Tensor, same: Tensor, pm: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Eq. 8's ``C = g - g^T`` ``(B, K, N, N)`` from ``g`` ``(B, N, N, K)``, with ``C`` pinned to 0 where
    ``same`` (equal elements) and on padded pairs (``pm`` False), and ``keep``, where ``C`` is not
    zeroed: ``(B, N, N)`` with ``pm``, else ``(B, 1, 1)``.

    ``F(x_i, x_j) = 0`` exactly when ``x_i == x_j``: the rounding of ``g`` there is removed, not its
    derivative (``dF/dx_i = d1 f - d2 f`` is not 0 at ``x_i = x_j``). Padded pairs are 0 with no
    gradient; so is a set whose real pairs are all equal (its cost is 0, which eq. 10 cannot
    normalise: the uniform assignment results, not a gradient / eps)."""
    # (B, K, N, N), made contiguous: with K > 1 channels (a lattice's two) the moved view keeps the
    # channel innermost, and eq. 10's per-channel max and norm and the optimisation's per-channel
    # products would stride over it (a no-op for K = 1)
    g = g.movedim(-1, 1).contiguous()
    C = g - g.transpose(-1, -2)                       # exactly anti-symmetric, zero diagonal
    C = C - torch.where(same.unsqueeze(1), C.detach(), 0.0)
    unequal = ~same if pm is None else ~same & pm
    keep = unequal.flatten(1).any(1)[:, None, None]   # (B, 1, 1)
    if pm is not None:
        keep = keep & pm
    return torch.where(keep.unsqueeze(1), C, 0.0), keep


def _cost_tail(g: Tensor, x: Tensor, mask: Optional[Tensor], eps: float):
    """Eq. 8 and 10 from the pairwise scores ``g`` ``(B, N, N, K)`` of the elements ``x`` ``(B, N, D)``
    (padding zeroed): :func:`_antisymmetric`, then :func:`_unit_norm`; returns ``y, n, m, active``
    and ``keep``. One pure function: run as it is, or compiled by ``torch.compile`` into a few fused
    loops (the compiled kernel)."""
    C, keep = _antisymmetric(g, equal_pairs(x, mask), pair_mask(mask))
    if C.numel() == 0:                                # no set, or empty sets: nothing to normalise
        ones = C.new_ones(C.shape[:2] + (1, 1))
        return C, ones, ones, ones > 0, keep
    return (*_unit_norm(C, eps), keep)


def _cost_tail_grad(y: Tensor, n: Tensor, m: Tensor, active: Tensor, keep: Tensor, g: Optional[Tensor],
                    g_n: Optional[Tensor]) -> Optional[Tensor]:
    """``dL/dg`` ``(B, N, N, K)`` of :func:`_cost_tail` from its outputs: eq. 10's closed form
    (:func:`_unit_norm_grad`), ``keep``'s zeros, and the adjoint of ``g - g^T``."""
    grad = _unit_norm_grad(y, n, m, active, g, g_n)
    if grad is None:
        return None
    grad = torch.where(keep.unsqueeze(1), grad, 0.0)
    return (grad - grad.transpose(-1, -2)).movedim(1, -1)


_TAIL = "eq. 8 and 10 after the pairwise MLP"         # (as warnings name it)


class _CostTail(torch.autograd.Function):
    """:func:`_cost_tail` with its backward in closed form (:func:`_cost_tail_grad`), which keeps the
    result ``y``, the per-set scalars and ``keep``; the compiled kernel runs both as compiled
    functions (each a few fused loops instead of some 30 and 10 operations). ``n`` is an output
    (the caller drops it) so that a differentiated backward (``create_graph=True``) reaches ``g``
    through ``n`` as well as ``y``; that backward runs as plain operations."""

    @staticmethod
    @signature_kept
    def forward(g: Tensor, x: Tensor, mask: Optional[Tensor], eps: float, kernel: str):
        if kernel != "chunked" and not is_compiling():
            out = _call_compiled(_cost_tail, g, x, mask, eps, fall_back=kernel == "auto-compiled", what=_TAIL)
            if out is not None:
                return tuple(out)
        return _cost_tail(g, x, mask, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        y, n, m, active, keep = output
        ctx.kernel = inputs[-1]
        ctx.mark_non_differentiable(m, active, keep)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y, n, m, active, keep)

    @staticmethod
    def backward(ctx, g: Optional[Tensor], g_n: Optional[Tensor], *_unused):
        saved = ctx.saved_tensors
        grad = None
        if ctx.kernel != "chunked" and not torch.is_grad_enabled() and not is_compiling() and g is not None:
            grad = _call_compiled(_cost_tail_grad, *saved, g, g_n, fall_back=ctx.kernel == "auto-compiled",
                                  what=_TAIL)
        if grad is None:
            grad = _cost_tail_grad(*saved, g, g_n)
        return grad, None, None, None, None


def _two_layer_cost(a: Tensor, c: Tensor, w2: Tensor, x: Tensor, mask: Optional[Tensor], eps: float):
    """Eq. 8 - 10 for the two-layer ``f`` from its projections ``a``, ``c`` ``(B, N, H)`` (see
    :func:`setperm.pairwise.element_projections`) and last weight ``w2`` ``(K, H)``: the pairwise MLP's
    broadcast-and-reduce expression, then :func:`_cost_tail`; one pure function, which the compiled
    kernel compiles whole (one compiled region instead of two)."""
    return _cost_tail(_fused_forward(a, c, w2), x, mask, eps)


def _two_layer_cost_grad(y: Tensor, n: Tensor, m: Tensor, active: Tensor, keep: Tensor, g: Tensor,
                         g_n: Optional[Tensor], a: Tensor, c: Tensor, w2: Tensor):
    """``grad_a``, ``grad_c``, ``grad_w2`` of :func:`_two_layer_cost` from its outputs (``g`` and
    ``g_n``: the gradients of ``y`` and ``n``): :func:`_cost_tail_grad`, then the pairwise MLP's
    contractions (:func:`setperm.pairwise._fused_backward`)."""
    return _fused_backward(a, c, w2, _cost_tail_grad(y, n, m, active, keep, g, g_n))


_COST = "the pairwise MLP with eq. 8 and 10"           # (as warnings name it)


class _TwoLayerCost(torch.autograd.Function):
    """The normalised cost of a two-layer ``f`` from its projections: :func:`_two_layer_cost`, with
    the backward of :class:`_CostTail` followed by the pairwise MLP's (:class:`setperm.pairwise.
    _PairwiseTwoLayer`'s). It keeps what those two keep: the result ``y``, the per-set scalars,
    ``keep``, and the inputs of :func:`setperm.pairwise.element_projections` (``xs``, ``w_a``, ``w_b``,
    ``bias``), from which backward recomputes ``a`` and ``c``; the pairwise scores ``g`` are not kept.

    One function so that the compiled kernel runs each way as one compiled function: each compiled
    region's entry (dynamo's guards, its wrappers) costs the host time at every call, which on CUDA
    no kernel hides, and the pairwise MLP and eq. 8 and 10 compiled apart took four. With
    ``"chunked"``, where the compiled function is refused, and in a differentiated backward
    (``create_graph=True``) the same maths runs as the chunked loops and plain operations
    (differentiable twice)."""

    @staticmethod
    @signature_kept
    def forward(a: Tensor, c: Tensor, w2: Tensor, x: Tensor, mask: Optional[Tensor], eps: float, kernel: str,
                xs: Tensor, w_a: Tensor, w_b: Tensor, bias: Optional[Tensor]):
        if is_compiling():
            return _two_layer_cost(a, c, w2, x, mask, eps)
        if kernel != "chunked":
            out = _call_compiled(_two_layer_cost, a, c, w2, x, mask, eps, fall_back=kernel == "auto-compiled",
                                 what=_COST)
            if out is not None:
                return tuple(out)
        return _cost_tail(_two_layer_forward(a, c, w2, "chunked"), x, mask, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        y, n, m, active, keep = output
        _, _, w2, _, _, _, ctx.kernel, xs, w_a, w_b, bias = inputs
        ctx.mark_non_differentiable(m, active, keep)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(y, n, m, active, keep, xs, w_a, w_b, bias, w2)

    @staticmethod
    def backward(ctx, g: Optional[Tensor], g_n: Optional[Tensor], *_unused):
        y, n, m, active, keep, xs, w_a, w_b, bias, w2 = ctx.saved_tensors
        none = (None,) * 8                   # (x, mask, eps, kernel and the projections' inputs)
        # (with create_graph, a graph from the kept inputs: a second derivative reaches them
        # through the recomputed a and c as it would through the forward's)
        a, c = element_projections(xs, w_a, w_b, bias)
        if is_compiling():
            return (*_two_layer_cost_grad(y, n, m, active, keep, g, g_n, a, c, w2), *none)
        if ctx.kernel != "chunked" and not torch.is_grad_enabled() and g is not None:
            grads = _call_compiled(_two_layer_cost_grad, y, n, m, active, keep, g, g_n, a, c, w2,
                                   fall_back=ctx.kernel == "auto-compiled", what=_COST)
            if grads is not None:
                return (*grads, *none)
        grad = _cost_tail_grad(y, n, m, active, keep, g, g_n)
        if grad is None:
            return (None, None, None, *none)
        return (*_two_layer_backward(a, c, w2, grad, "chunked"), *none)


def _check_layers(first_weight: Tensor, first_bias: Optional[Tensor], hidden, last_weight: Tensor) -> None:
    """The shapes of f's layers after the first weight, each named as :func:`pairwise_cost` takes it."""
    def shape(t) -> str:
        return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__

    width = first_weight.shape[0]
    if first_bias is not None and (not isinstance(first_bias, Tensor) or tuple(first_bias.shape) != (width,)):
        raise ValueError(f"first_bias must be None or have shape ({width},) to match first_weight "
                         f"{tuple(first_weight.shape)}, got {shape(first_bias)}")
    for k, layer in enumerate(hidden):
        if not isinstance(layer, (tuple, list)) or len(layer) != 2:
            raise ValueError(f"hidden[{k}] must be a (weight, bias) pair, got {type(layer).__name__}")
        weight, bias = layer
        if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != width:
            raise ValueError(f"hidden[{k}]'s weight must have shape (H', {width}), got {shape(weight)}")
        width = weight.shape[0]
        if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (width,)):
            raise ValueError(f"hidden[{k}]'s bias must be None or have shape ({width},), got {shape(bias)}")
    if not isinstance(last_weight, Tensor) or last_weight.dim() != 2 or last_weight.shape[1] != width:
        raise ValueError(f"last_weight must have shape (K, {width}), got {shape(last_weight)}")


def pairwise_cost(x: Tensor, first_weight: Tensor, first_bias: Optional[Tensor],
                  hidden: Sequence[Tuple[Tensor, Optional[Tensor]]], last_weight: Tensor,
                  mask: Optional[Tensor] = None, *, normalize: bool = True, kernel: str = "auto",
                  lengths: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Functional form of :class:`PairwiseCost` (as ``F.linear`` is of ``nn.Linear``).

    Args:
        x: ``(B, N, D)`` elements; padded elements may hold anything (they are replaced by zeros
            before any arithmetic).
        first_weight: ``(H, 2D)`` weight of f's first layer on ``[x_i; x_j]``; ``first_bias`` ``(H,)``
            or None.
        hidden: ``(weight, bias)`` pairs of f's further layers (each followed by ReLU) between the
            first and the last, ``weight`` ``(H', H)``, ``bias`` ``(H',)`` or None; empty for the
            two-layer f of the paper.
        last_weight: ``(K, H_last)``; a last-layer bias would cancel in ``g - g^T`` and is not used.
        mask: ``(B, N)`` bool, True = real element; or ``lengths`` ``(B,)``, or
            ``key_padding_mask`` ``(B, N)`` (True = padding); at most one of the three.
        normalize: divide by the Frobenius norm per set and channel (eq. 10).
        kernel: ``"auto"`` (per device), ``"chunked"`` or ``"compiled"`` evaluation of a two-layer
            ``f`` (see :func:`setperm.pairwise.pairwise_two_layer`; ``"fused"`` is ``"compiled"``
            here); a deeper ``f`` is always evaluated by plain operations (``"compiled"`` is
            refused for it). Eq. 8 and 10 after ``f`` run compiled where the kernel resolves to
            ``"compiled"`` (on CUDA by default, for a deeper ``f`` too), else as plain operations.
    Returns:
        ``(B, K, N, N)`` anti-symmetric cost, zero on padded pairs, unit Frobenius norm per set and
        channel when ``normalize`` (except a channel whose Frobenius norm lies below
        :func:`normalize_cost`'s ``eps`` = 1e-12, which it divides by ``eps``, as eq. 10 with the
        norm clamped at ``eps``: elements that differ by about that little; a set whose elements are all equal has cost 0 and no gradient).
        Finite for any finite ``x`` when ``normalize`` (see :func:`set_scale`).
    """
    check_kernel(kernel)
    if not isinstance(first_weight, Tensor) or first_weight.dim() != 2 or first_weight.shape[1] % 2:
        got = tuple(first_weight.shape) if isinstance(first_weight, Tensor) else type(first_weight).__name__
        raise ValueError(f"first_weight must have shape (H, 2D), got {got}")
    check_set(x, features=first_weight.shape[1] // 2)
    check_same_device(first_weight, "first_weight", x, "x")
    check_dtype(x, first_weight.dtype)
    hidden = list(hidden)
    _check_layers(first_weight, first_bias, hidden, last_weight)
    if hidden and kernel == "compiled":
        raise ValueError(f"kernel={kernel!r} supports a two-layer f only (one hidden width); got "
                         f"{len(hidden)} further hidden layer(s): use kernel='chunked'")
    mask = resolve_mask(x, mask, lengths, key_padding_mask)
    x = zero_padding(x, mask)                         # (nor do they set the scale below)
    D = x.shape[-1]
    w_a, w_b = first_weight[:, :D], first_weight[:, D:]
    scale = set_scale(x)[:, None, None]                # (B, 1, 1); f evaluated on x / s, biases / s
    xs = x / scale
    bias = None if first_bias is None else first_bias / scale
    a, c = element_projections(xs, w_a, w_b, bias)    # W_a x_i + b, W_b x_j: once per element
    if not hidden and normalize:
        # f, eq. 8 and 10 in one autograd function (backward recomputes a and c from xs: (B, N, D)
        # kept instead of two (B, N, H)); the scale s cancels in eq. 10
        # (one dtype for the kernels, as pairwise_two_layer; element_projections gives c in a's)
        w2 = last_weight.to(a.dtype)
        return _TwoLayerCost.apply(a, c, w2, x.detach(), mask, NORM_EPS,
                                   kernel_to_call(kernel, x.device), xs, w_a, w_b, bias)[0]
    if not hidden:
        # (backward recomputes a and c from xs: (B, N, D) kept instead of two (B, N, H))
        g = pairwise_two_layer(a, c, last_weight, kernel, projections=(xs, w_a, w_b, bias))   # (B, N, N, K)
    else:
        h = torch.relu(a.unsqueeze(2) + c.unsqueeze(1))
        scale4 = scale.unsqueeze(-1)                                               # (B, 1, 1, 1)
        for weight, bias in hidden:
            pre = h @ weight.t()
            h = torch.relu(pre + bias / scale4 if bias is not None else pre)
        g = h @ last_weight.t()
    # g / s: eq. 8 and 10 from it (the scale s cancels in eq. 10)
    if normalize:
        return _CostTail.apply(g, x.detach(), mask, NORM_EPS, kernel_to_call(kernel, x.device))[0]
    C, _ = _antisymmetric(g, equal_pairs(x.detach(), mask), pair_mask(mask))
    return C * scale.unsqueeze(1)


def hidden_widths(hidden, name: str) -> Tuple[int, ...]:
    """The hidden widths of f: one positive integer (numpy's too), or a non-empty sequence of them."""
    one = isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool)
    widths = [hidden] if one else (list(hidden) if isinstance(hidden, Sequence) and not isinstance(hidden, str) else [])
    if not widths or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1 for w in widths):
        raise ValueError(f"{name} must be a positive int or a non-empty sequence of them, got {hidden!r}")
    return tuple(int(w) for w in widths)


class PairwiseCost(nn.Module):
    """Learned anti-symmetric ordering cost ``C`` of a set (eq. 8-10).

    Args:
        in_features: element dimension D.
        hidden: hidden width of f (int), or a sequence of widths for a deeper f.
        channels: number K of cost matrices (1 for sequences, 2 for lattices: horizontal, vertical).
        normalize: divide by the Frobenius norm per set and channel (eq. 10).
        kernel: ``"auto"`` (default: ``"compiled"`` on CUDA, ``"chunked"`` elsewhere), ``"chunked"``
            or ``"compiled"`` (torch.compile-fused pairwise MLP and eq. 8 and 10 after it, faster
            after a one-off compilation on first use; two-layer f only), see
            :mod:`setperm.pairwise`; measured speed-ups in ``benchmarks/README.md``. ``"fused"``
            evaluates the cost as ``"compiled"`` (a deeper f by plain operations); it matters to the
            optimisation that consumes the cost.
        device, dtype: where and in which dtype to create the parameters (as ``nn.Linear``).

    All arguments after ``hidden`` are keyword-only. Functional form:
    :func:`setperm.functional.pairwise_cost` (on this module's weight and bias tensors).

    Shapes: ``forward(x (B, N, D), mask (B, N) | None, *, lengths (B,) | None,
    key_padding_mask (B, N) | None) -> C (B, K, N, N)``. Padded elements may hold anything
    (they are replaced by zeros before any arithmetic).

    Submodules: f's layers ``first`` (``Linear(2 * in_features, hidden)``, on ``[x_i; x_j]``),
    ``hidden`` and ``last`` (bias-free) hold its weights; forward reads them and never calls the
    layers, so hooks on them do not run (a warning says so) and weights reparametrised by hooks
    (``torch.nn.utils.prune``) are not updated; ``torch.nn.utils.parametrize`` applies.
    """

    def __init__(self, in_features: int, hidden: Union[int, Sequence[int]], *, channels: int = 1,
                 normalize: bool = True, kernel: str = "auto", device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        check_kernel(kernel)
        in_features = check_int(in_features, "in_features", 1)
        channels = check_int(channels, "channels", 1)
        widths = list(hidden_widths(hidden, "hidden"))
        if len(widths) > 1 and kernel == "compiled":
            raise ValueError(f"kernel={kernel!r} supports a two-layer f only (one hidden width), got hidden={hidden!r}")
        self.in_features = in_features
        self.hidden_sizes = tuple(widths)
        self.channels = channels
        self.normalize = normalize
        self.kernel = kernel
        self.first = uninitialized(nn.Linear, 2 * in_features, widths[0], **factory_kwargs)
        self.hidden = nn.ModuleList(uninitialized(nn.Linear, w0, w1, **factory_kwargs)
                                    for w0, w1 in zip(widths[:-1], widths[1:]))
        # The last layer's bias cancels in g - g^T (eq. 8); it is left out so that every parameter
        # is used (DistributedDataParallel rejects unused ones).
        self.last = uninitialized(nn.Linear, widths[-1], channels, bias=False, **factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Paper appendix F: Xavier weights (the released code uses zero biases)."""
        for lin in [self.first, *self.hidden, self.last]:
            xavier_linear_(lin)

    def pair_scores(self, x_i: Tensor, x_j: Tensor) -> Tensor:
        """``f(x_i, x_j)`` for explicit pairs ``(..., D)`` -> ``(..., K)`` (for plots and analysis)."""
        h = torch.relu(self.first(torch.cat([x_i, x_j], dim=-1)))
        for layer in self.hidden:
            h = torch.relu(layer(h))
        return self.last(h)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, *, lengths: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        check_set(x, features=self.in_features)
        check_module_device(x, self)
        check_dtype(x, self.first.weight.dtype)
        mask = resolve_mask(x, mask, lengths, key_padding_mask)
        self._warn_uncalled_hooks()
        return pairwise_cost(x, self.first.weight, self.first.bias,
                             [(layer.weight, layer.bias) for layer in self.hidden], self.last.weight, mask,
                             normalize=self.normalize, kernel=self.kernel)

    def _warn_uncalled_hooks(self) -> None:
        """Warn about hooks on f's layers: forward reads their weights and never calls them (the
        pairs ``[x_i; x_j]`` of eq. 8 are never built), so those hooks never run, and a weight that a
        forward pre-hook recomputes (``torch.nn.utils.prune``, the older ``torch.nn.utils.weight_norm``
        and ``spectral_norm``) stays as the hook last left it: frozen, or a graph that a second
        backward cannot traverse."""
        layers = [("first", self.first), *((f"hidden.{k}", layer) for k, layer in enumerate(self.hidden)),
                  ("last", self.last)]
        for name, layer in layers:
            kinds = registered_hooks(layer)
            if kinds:
                warnings.warn(f"setperm: PairwiseCost reads the weights of its layer {name!r} and never calls it "
                              f"(the pairs of eq. 8 are never built), so the {' and '.join(kinds)} registered on "
                              "it do not run; a weight that such a hook recomputes (torch.nn.utils.prune, "
                              "torch.nn.utils.weight_norm / spectral_norm) is not updated. "
                              "torch.nn.utils.parametrize applies (torch.nn.utils.parametrizations.weight_norm, "
                              "spectral_norm, orthogonal)", RuntimeWarning, stacklevel=user_stacklevel())

    def extra_repr(self) -> str:
        hidden = self.hidden_sizes[0] if len(self.hidden_sizes) == 1 else self.hidden_sizes
        return (f"in_features={self.in_features}, hidden={hidden}, channels={self.channels}, "
                f"normalize={self.normalize}, kernel={self.kernel!r}")
