"""The Sinkhorn operator (paper appendix B, eq. 11-15), with masking.

Two ways to compute the same operator (the names follow POT's ``sinkhorn`` variants):

- ``method="scaling"``: scalings ``diag(u) K diag(v)`` of one matrix ``K = exp(z - rowmax)``
  (matrix-vector products, a closed-form backward), valid while the scalings' range fits the dtype;
- ``method="log"``: the explicit log-domain iterates of eq. 11-12 (``logsumexp``), finite for any
  finite input;
- ``method="auto"`` (default): on the CPU, the scalings when :func:`sinkhorn_scaling_in_range`
  holds, else the log-domain iterates (a host-side choice, one synchronisation, free on the CPU);
  on other devices and under ``torch.compile``, the log-domain iterates, which need no choice and
  hence no host synchronisation (the range check would stall CUDA's launch queue on every call).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._compat import autocast_off, signature_kept
from ._errors import check_int, check_positive
from .masking import assignment_mask, host_decisions, resolve_mask

METHODS = ("auto", "scaling", "log")


def sinkhorn(logits: Tensor, mask: Optional[Tensor] = None, *, iters: int = 4, temperature: float = 1.0,
             lengths: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
             method: str = "auto") -> Tensor:
    """Normalise ``exp(logits / temperature)`` towards a doubly-stochastic matrix.

    Args:
        logits: ``(B, N, N)`` floating-point unnormalised assignment P~; rows = elements, columns =
            positions.
        mask: ``(B, N)`` bool, True = real element, or None. ``lengths`` ``(B,)`` (prefix padding)
            or ``key_padding_mask`` ``(B, N)`` (True = padding) may be given instead (at most one).
        iters: number L of (row, column) normalisation rounds; the paper fixes L = 4 (appendix B).
        temperature: divides the logits before exponentiation (Mena et al., 2018).
        method: ``"auto"`` (default), ``"scaling"`` or ``"log"`` (see the module docstring). All
            three compute the same operator (to rounding); ``"auto"`` makes no host
            synchronisation off the CPU; ``"scaling"`` raises a ValueError when the scalings'
            range check (:func:`sinkhorn_scaling_in_range`) fails, instead of falling back.

    Returns:
        ``(B, N, N)`` P = S(P~) in the dtype of ``logits``. Each round normalises rows then
        columns (eq. 14), so columns sum to 1 exactly and rows approximately. With a mask, the
        real elements are assigned among the first n positions only and the j-th padded element
        is fixed to position n + j (one-hot), so the real block equals the unpadded result.
        Empty inputs (B = 0 or N = 0) give an empty result.

    Finite for any finite input: where the log-domain iterates are used, ``logits / temperature``
    is clamped to half the dtype's range (``±finfo.max / 2``; only logits beyond it, and ``+inf``,
    change, and they get no gradient; ``-inf`` stays an excluded entry), so no difference of two
    logits overflows. Computed in at least float32 (under autocast or for half inputs).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    z, out_dtype = _prepare(logits, mask, iters, temperature, lengths, key_padding_mask)
    return normalised(z, out_dtype, iters, method)


def normalised(z: Tensor, out_dtype: torch.dtype, iters: int, method: str = "auto") -> Tensor:
    """:func:`sinkhorn` of the prepared logits ``z`` (:func:`_prepare` or :func:`masked_logits`)."""
    if z.numel() == 0:
        return z.to(out_dtype)
    if method == "auto" and not host_decisions(z):
        method = "log"
    with autocast_off(z.device.type):
        return _Sinkhorn.apply(z, iters, method)[0].to(out_dtype)


def sinkhorn_scaling_in_range(logits: Tensor, mask: Optional[Tensor] = None, *, iters: int = 4,
                              temperature: float = 1.0, lengths: Optional[Tensor] = None,
                              key_padding_mask: Optional[Tensor] = None) -> bool:
    """Whether ``sinkhorn(logits, ..., method="scaling")`` applies to these arguments: True when the
    scaling vectors' spread fits the working dtype (see ``_scalings``), which is exactly when
    ``method="auto"`` computes with them on the CPU; False when ``"auto"`` falls back to the
    log-domain iterates there (and ``"scaling"`` raises). Same arguments as :func:`sinkhorn`; one
    host synchronisation (off the CPU, ``"auto"`` always takes the log domain and never calls it).
    Use it to count how often the fallback fires on real data.
    """
    z, _ = _prepare(logits, mask, iters, temperature, lengths, key_padding_mask)
    if z.numel() == 0 or iters == 0:
        return True
    with torch.no_grad(), autocast_off(logits.device.type):
        return _scalings(z.detach(), iters) is not None


def _prepare(logits: Tensor, mask: Optional[Tensor], iters: int, temperature: float, lengths: Optional[Tensor],
             key_padding_mask: Optional[Tensor]):
    """Validate the arguments; return the masked ``z = logits / temperature`` in the compute dtype
    and the output dtype."""
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[1] != logits.shape[2]:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must have shape (B, N, N), got {got}")
    if not logits.is_floating_point():
        # exp of integer/bool logits is not defined in their dtype; complex has no order
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    check_int(iters, "iters")
    temperature = check_positive(temperature, "temperature")
    mask = resolve_mask(logits, mask, lengths, key_padding_mask, name="logits")
    return masked_logits(logits, assignment(mask, logits), temperature), logits.dtype


def assignment(mask: Optional[Tensor], logits: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
    """What a mask makes of the logits, once for every :func:`masked_logits` of one batch: the
    allowed entries ``free`` (:func:`~setperm.masking.assignment_mask`, ``(B, N, N)`` bool) and the
    value of every other entry, 0 where a padded element is pinned, ``-inf`` elsewhere, in the
    compute dtype of ``logits`` (None without a mask). An unrolled optimisation normalises the same
    padded batch at every step: made once there, it saves the mask's ten or so operations (kernel
    launches on a GPU) per step."""
    if mask is None:
        return None
    dtype = torch.promote_types(logits.dtype, torch.float32)
    free, pinned = assignment_mask(mask)
    excluded = torch.where(pinned, torch.zeros((), dtype=dtype, device=logits.device),
                           torch.full((), float("-inf"), dtype=dtype, device=logits.device))
    return free, excluded


def masked_logits(logits: Tensor, fill: Optional[Tuple[Tensor, Tensor]], temperature: float) -> Tensor:
    """``logits / temperature`` in at least float32, the entries a mask excludes replaced as
    :func:`assignment` says (``fill``; None: no mask)."""
    with autocast_off(logits.device.type):
        z = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if temperature != 1.0:
            z = z / temperature
        if fill is not None:
            # a padded element's row and column have one allowed entry, its fixed position, which
            # normalises to 1 whatever its logit: it is given 0, so that NaN or inf padding never
            # reaches a logsumexp (a NaN there would spread through its column to every real row)
            free, excluded = fill
            z = torch.where(free, z, excluded)
    return z


def _clamp_half(z: Tensor) -> Tensor:
    """``z`` clamped to half the dtype's range, ``-inf`` (excluded entries) kept. Then no
    ``z_ij - z_ik`` overflows, and every log-domain iterate stays in ``[-(finfo.max + 2L log N), 0]``
    (each half-step ``y - logsumexp(y)`` is <= 0 and lowers the minimum by at most log N), so the
    iterates are finite for any finite input. The scaling path needs no clamp: its range check
    fails (and the log domain takes over) whenever a logit difference overflows."""
    half = torch.finfo(z.dtype).max / 2
    return torch.where(torch.isneginf(z), z, z.clamp(-half, half))


def _log_iterates(z: Tensor, iters: int) -> List[Tensor]:
    """The ``2 * iters`` log-domain half-steps (eq. 11 then 12, each ``y - logsumexp(y, dim)``):
    rows (over positions) then columns (over elements) sum to 1 after exponentiation."""
    out, y = [], z
    for dim in [2, 1] * iters:
        y = y - torch.logsumexp(y, dim=dim, keepdim=True)
        out.append(y)
    return out


def _scalings(z: Tensor, iters: int, check: bool = True):
    """The same operator as scalings of one matrix: ``S^(2t) = diag(u_t) K diag(v_{t-1})`` and
    ``S^(2t+1) = diag(u_t) K diag(v_t)`` with ``K = exp(z - rowmax)``, ``v_0 = 1``,
    ``u_t = 1 / (K v_{t-1})`` (eq. 11: rows) and ``v_t = 1 / (K^T u_t)`` (eq. 12: columns).

    Each half-step is a matrix-vector product instead of a pass that rewrites the ``(N, N)``
    iterate, and ``P = u_L K v_L`` is formed once. A per-row shift of ``z`` cancels in the first row
    normalisation, so subtracting the row maximum changes nothing but the range.

    Returns ``(K, us, vs)`` with ``us``/``vs`` lists of ``(B, 1, N)`` rows (``vs[0]`` = 1), or
    None when the scalings' spread is too wide for the working dtype (underflowing sums, or
    products of scalings that could overflow in backward): the caller then uses the log domain,
    which is finite for any finite input. One host synchronisation per call; ``check=False`` skips
    the range check (backward recomputes scalings that forward has already checked).
    """
    K = z - z.amax(dim=2, keepdim=True)
    K = K.exp_() if not K.requires_grad else K.exp()                      # (B, N, N), row maxima 1
    Kt = K.transpose(1, 2)
    v = torch.ones_like(K[:, :1])                                         # (B, 1, N)
    us, vs = [], [v]
    for _ in range(iters):
        # Row vectors times a matrix: the fastest batched matrix-vector product on CPU.
        u = torch.bmm(v, Kt).reciprocal()                                 # (K v)^T
        v = torch.bmm(u, K).reciprocal()                                  # (K^T u)^T
        us.append(u)
        vs.append(v)
    # u_i v_j <= max(v) / min(v) over the iterates (u_i <= 1 / v_j* at the row maximum K_ij* = 1):
    # bounding this spread keeps every product of scalings in forward and backward finite and
    # every entry of P that matters (>= eps) a normal float. NaN/inf fail the comparison.
    if not check:
        return K, us, vs
    allv = torch.cat(vs, dim=1)
    spread = allv.amax(dim=(1, 2)) / allv.amin(dim=(1, 2))
    if not bool((spread <= torch.finfo(z.dtype).max ** 0.4).all()):
        return None
    return K, us, vs


class _Sinkhorn(torch.autograd.Function):
    """``exp`` of ``iters`` alternating row/column log-normalisations of ``z`` (eq. 13-15).

    Computed with scaling vectors (:func:`_scalings`, ~5 passes over the ``(B, N, N)`` matrix
    instead of ~4 per iteration) when their range allows and ``method`` is not ``"log"``, else by
    explicit log-domain iterates.
    Saves only the input and the output; backward recomputes the scalings (matrix-vector
    products) and applies the exact derivative in closed form, or, in the log-domain case,
    recomputes the iterates and applies ``dz = dy - softmax(z, dim) * sum(dy, dim)`` per half-step.
    The backward is written in differentiable operations (double backward). Forward and
    ``setup_context`` apart, so that ``torch.func`` transforms (``vjp``, ``grad``) differentiate it;
    which path forward took is its second, non-tensor output.
    """

    @staticmethod
    @signature_kept
    def forward(z: Tensor, iters: int, method: str) -> Tuple[Tensor, bool]:
        scal = _scalings(z, iters) if iters > 0 and method != "log" else None
        if scal is None and iters > 0 and method == "scaling":
            raise ValueError(f"sinkhorn(method='scaling'): the scaling vectors' range is too wide for {z.dtype} "
                             "(some row or column sum underflows); use method='auto' (falls back to the "
                             "log-domain iterates) or method='log'")
        if scal is not None:
            K, us, vs = scal
            return K.mul_(us[-1].transpose(1, 2)).mul_(vs[-1]), True      # K is not needed any more
        # S^(0) = exp(X); in the log domain the exponentiation is implicit.
        return (_log_iterates(_clamp_half(z), iters)[-1] if iters > 0 else z).exp(), False

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, iters, _ = inputs
        P, ctx.scaled = output
        ctx.iters = iters
        ctx.save_for_backward(z, P)

    @staticmethod
    def backward(ctx, grad_P: Tensor, _grad_scaled=None):
        z, P = ctx.saved_tensors
        if ctx.scaled:
            return _scaled_backward(grad_P, P, *_scalings(z, ctx.iters, check=False)), None, None
        dims = [2, 1] * ctx.iters
        zc = _clamp_half(z) if ctx.iters > 0 else z
        # the softmax of every half-step is its normalised output; the last one is P
        softmaxes = [y.exp() for y in _log_iterates(zc, ctx.iters)[:-1]] + [P]
        g = grad_P * P                                                   # through exp
        for d, S in zip(reversed(dims), reversed(softmaxes)):
            g = g - S * g.sum(dim=d, keepdim=True)                       # through z - logsumexp(z, d)
        if ctx.iters > 0:                                                # through the clamp
            g = torch.where(zc == z, g, 0.0)
        return g, None, None


def _scaled_backward(grad_P: Tensor, P: Tensor, K: Tensor, us, vs) -> Tensor:
    """Exact ``dL/dz`` for ``P = diag(u_L) K diag(v_L)`` of :func:`_scalings`.

    In log-scalings ``a = log u``, ``b = log v``: ``P = exp(a_i + log K_ij + b_j)``, so with
    ``Q = dL/dP * P`` the gradients are ``g_a = Q 1``, ``g_b = Q^T 1``, and each half-step
    ``b_t = -log(K^T e^{a_t})`` / ``a_t = -log(K e^{b_{t-1}})`` passes them back as
    ``g_a += -u_t . K (v_t . g_b)`` / ``g_b = -v_{t-1} . K^T (u_t . g_a)`` while contributing the
    rank-one terms ``-K . (u_t (v_t . g_b)^T)`` and ``-K . ((u_t . g_a) v_{t-1}^T)`` to ``dL/dz``.
    All rank-one terms are summed by one ``(N, 2L) x (2L, N)`` matrix product.
    """
    Kt = K.transpose(1, 2)
    Q = grad_P * P
    g_a = Q.sum(2).unsqueeze(1)                                          # (B, 1, N)
    g_b = Q.sum(1, keepdim=True)                                         # (B, 1, N)
    left, right = [], []
    for t in range(len(us), 0, -1):
        u, v, v_prev = us[t - 1], vs[t], vs[t - 1]
        vg = v * g_b
        left.append(u)
        right.append(vg)
        back = u * torch.bmm(vg, Kt)                                     # u . K (v . g_b)
        g_a = g_a - back if t == len(us) else -back                      # a_t for t < L only feeds b_t
        ug = u * g_a
        left.append(ug)
        right.append(v_prev)
        g_b = -v_prev * torch.bmm(ug, K)                                 # -v_{t-1} . K^T (u . g_a)
    rank_one = torch.bmm(torch.cat(left, 1).transpose(1, 2), torch.cat(right, 1))   # (B, N, N)
    if torch.is_grad_enabled():          # double backward: keep every operation recorded
        return Q - K * rank_one
    return Q.sub_(rank_one.mul_(K))      # in place: fewer fresh (B, N, N) buffers
