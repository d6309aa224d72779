"""Pairwise anti-symmetric ordering cost (paper section 2.3, eq. 8-10).

``C_ij = F(x_i, x_j) = f(x_i, x_j) - f(x_j, x_i)`` with ``f`` a small MLP on the concatenated
pair ``[x_i; x_j]``, then ``C / ||C||_F`` per set and per cost channel.

Two facts make this cheap:
- the first layer of ``f`` on ``[x_i; x_j]`` is ``W_a x_i + W_b x_j + b``: the two projections are
  computed once per element and broadcast, the ``(B, N, N, 2D)`` pairs are never built;
- ``g_ij = f(x_i, x_j)`` is evaluated once and ``C = g - g^T``; ``f`` is not run twice.
For the common two-layer ``f`` a custom autograd function evaluates ``g`` in row chunks and
recomputes the ``(B, N, N, hidden)`` activations in backward instead of storing them, so memory
grows as ``N^2 * K`` rather than ``N^2 * hidden``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .masking import pair_mask

# Elements per chunk of the (sets, rows, N, hidden) pairwise activations: small enough that a
# chunk stays in the per-core L2 cache (1 MiB in float32), so its elementwise passes do not go to
# DRAM, and one preallocated buffer is reused (no page faults from fresh large allocations);
# large enough that the per-chunk Python overhead stays small against the arithmetic.
_CHUNK_ELEMENTS = 1 << 18


def _rows_per_chunk(B: int, N: int, H: int) -> int:
    return max(1, min(N, _CHUNK_ELEMENTS // max(1, B * N * H)))


def _sets_per_chunk(B: int, N: int, H: int) -> int:
    """Whole sets per chunk (>= 1) when one set fits a chunk, else 0 (row blocks of one set)."""
    per_set = max(1, N * N * H)
    return min(B, _CHUNK_ELEMENTS // per_set) if per_set <= _CHUNK_ELEMENTS else 0


def _chunks(B: int, N: int, H: int):
    """Yield ``(b0, b1, i0, i1)`` in order: several whole sets per chunk, or row blocks of one set."""
    step = _sets_per_chunk(B, N, H)
    if step:
        for b0 in range(0, B, step):
            yield b0, min(B, b0 + step), 0, N
    else:
        rows = _rows_per_chunk(1, N, H)
        for b in range(B):
            for i0 in range(0, N, rows):
                yield b, b + 1, i0, min(N, i0 + rows)


def _chunk_buffer(a: Tensor, B: int, N: int, H: int) -> Tensor:
    step = _sets_per_chunk(B, N, H)
    return a.new_empty(step, N, N, H) if step else a.new_empty(1, _rows_per_chunk(1, N, H), N, H)


def _relu_mask(a: Tensor, neg_c: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``1[a_i + c_j > 0]`` as a float 0/1 tensor in one pass (``a_i > -c_j``), detached: relu' is
    piecewise constant, so no gradient flows through it."""
    if out is None:
        return torch.gt(a, neg_c).to(a.dtype)
    return torch.gt(a, neg_c, out=out)


class _PairwiseTwoLayer(torch.autograd.Function):
    """g[b, i, j, :] = relu(a[b, i] + c[b, j]) @ w2^T  without storing the (B, N, N, H) hidden.

    Backward uses ``m_ijh = relu'(a_ih + c_jh) = 1[a_ih + c_jh > 0]`` (recomputed per chunk) and
    only two contractions with it,
        T1[i, k, h] = sum_j go[i, j, k] m[i, j, h],   T2[j, k, h] = sum_i go[i, j, k] m[i, j, h],
    giving ``grad_a = T1 . w2``, ``grad_c = T2 . w2`` and, because ``relu(p) = m p`` with
    ``p = a_i + c_j``, ``grad_w2[k, h] = sum_i a[i, h] T1[i, k, h] + sum_j c[j, h] T2[j, k, h]``
    exactly, without another pass over the hidden activations. The backward is differentiable
    (double backward) through ``grad_out``, ``a``, ``c`` and ``w2``.
    """

    @staticmethod
    def forward(ctx, a: Tensor, c: Tensor, w2: Tensor) -> Tensor:
        B, N, H = a.shape
        K = w2.shape[0]
        out = a.new_empty(B, N, N, K)
        w2t = w2.t()
        buf = _chunk_buffer(a, B, N, H)
        for b0, b1, i0, i1 in _chunks(B, N, H):
            h = buf[:b1 - b0, :i1 - i0]                                         # (s, r, N, H)
            torch.add(a[b0:b1, i0:i1, None, :], c[b0:b1, None, :, :], out=h)
            h.relu_()
            torch.matmul(h, w2t, out=out[b0:b1, i0:i1])
        ctx.save_for_backward(a, c, w2)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        a, c, w2 = ctx.saved_tensors
        grad_out = grad_out.contiguous()     # it arrives as a permuted view (movedim, g - g^T)
        if torch.is_grad_enabled():          # create_graph: record the contractions (no out=)
            T1, T2 = _contractions_recorded(a, c, grad_out)
        else:
            T1, T2 = _contractions(a, c, grad_out)
        grad_a = torch.einsum("bikh,kh->bih", T1, w2)
        grad_c = torch.einsum("bjkh,kh->bjh", T2, w2)
        grad_w2 = torch.einsum("bih,bikh->kh", a, T1) + torch.einsum("bjh,bjkh->kh", c, T2)
        return grad_a, grad_c, grad_w2


def _contractions(a: Tensor, c: Tensor, grad_out: Tensor):
    """T1, T2 ``(B, N, K, H)`` of :class:`_PairwiseTwoLayer` into preallocated outputs (no graph)."""
    B, N, H = a.shape
    K = grad_out.shape[-1]
    T1 = a.new_empty(B, N, K, H)
    T2 = a.new_zeros(B, N, K, H)
    neg_c = -c
    go_t = grad_out.transpose(-1, -2).contiguous()                              # (B, N, K, N)
    buf = _chunk_buffer(a, B, N, H)
    prod = torch.empty_like(buf) if K > 1 else None
    for b0, b1, i0, i1 in _chunks(B, N, H):
        s, r = b1 - b0, i1 - i0
        m = _relu_mask(a[b0:b1, i0:i1, None, :], neg_c[b0:b1, None, :, :], out=buf[:s, :r])
        # T1: one contiguous batched matmul over (set, row i), contracting j.
        torch.bmm(go_t[b0:b1, i0:i1].view(s * r, K, N), m.view(s * r, N, H), out=T1[b0:b1, i0:i1].view(s * r, K, H))
        # T2 contracts i, which is not the inner dim of m: an in-place product and a reduction over
        # the cache-resident chunk beat a strided batched matmul (which falls back to a loop).
        for k in range(K):
            go_k = grad_out[b0:b1, i0:i1, :, k:k + 1]                           # (s, r, N, 1)
            pk = m.mul_(go_k) if k == K - 1 else torch.mul(m, go_k, out=prod[:s, :r])
            T2[b0:b1, :, k] += pk.sum(1)
    return T1, T2


def _contractions_recorded(a: Tensor, c: Tensor, grad_out: Tensor):
    """Same as :func:`_contractions` with differentiable (out-of-place) operations."""
    B, N, H = a.shape
    neg_c = -c.detach()
    t1_sets, t2_sets = [], []
    for b0, b1, i0, i1 in _chunks(B, N, H):
        m = _relu_mask(a.detach()[b0:b1, i0:i1, None, :], neg_c[b0:b1, None, :, :])
        go = grad_out[b0:b1, i0:i1]
        t1 = torch.matmul(go.transpose(-1, -2), m)                              # (s, r, K, H)
        t2 = torch.matmul(go.permute(0, 2, 3, 1), m.transpose(1, 2))            # (s, N, K, H)
        if i0 == 0:
            t1_sets.append([t1])
            t2_sets.append(t2)
        else:
            t1_sets[-1].append(t1)
            t2_sets[-1] = t2_sets[-1] + t2
    T1 = torch.cat([torch.cat(parts, dim=1) for parts in t1_sets], dim=0)
    return T1, torch.cat(t2_sets, dim=0)


def pairwise_two_layer(a: Tensor, c: Tensor, w2: Tensor) -> Tensor:
    """``g[b,i,j] = relu(a[b,i] + c[b,j]) @ w2^T`` for ``a, c`` (B, N, H), ``w2`` (K, H) -> (B, N, N, K).

    Memory-lean (hidden activations recomputed in backward); differentiable twice because its
    backward is written in differentiable torch operations.
    """
    return _PairwiseTwoLayer.apply(a, c, w2)


def _equal_pairs_by_hash(x: Tensor) -> Optional[Tensor]:
    """:func:`equal_pairs` in O(B N D + B N^2) when no two distinct elements of a set collide.

    Each element's bit pattern (with -0.0 mapped to +0.0, since ``-0.0 == 0.0``) gets an exact
    integer hash (no rounding: 32-bit words times 20-bit weights, summed in int64 without
    overflow). Equal elements have equal hashes, so if no off-diagonal pair of hashes is equal the
    only equal pairs are the diagonal ones (``x_i == x_i``, False only with NaN). Returns None
    (caller compares element-wise) on a hash collision or an unsupported dtype/size.
    """
    B, N, D = x.shape
    size = x.element_size()
    if size not in (2, 4, 8) or x.is_complex():
        return None
    word = torch.int16 if size == 2 else torch.int32
    bits = (x.detach() + 0.0).contiguous().view(word).to(torch.int64)    # + 0.0 maps -0.0 to +0.0
    bits = bits & (0xFFFF if size == 2 else 0xFFFFFFFF)
    words = bits.shape[-1]
    if words > 2048:
        return None
    weights = (torch.arange(1, words + 1, device=x.device, dtype=torch.int64) * 0x9E3B5) % (1 << 20) + 1
    h = (bits * weights).sum(-1)                                         # (B, N), exact
    same = h.unsqueeze(2) == h.unsqueeze(1)
    eye = torch.eye(N, dtype=torch.bool, device=x.device)
    if bool((same & ~eye).any()):
        return None
    return eye & (x == x).all(-1).unsqueeze(2)


def equal_pairs(x: Tensor) -> Tensor:
    """``(B, N, N)`` bool: True where ``x_i`` and ``x_j`` are bitwise identical elements.

    ``F(x, x) = 0`` exactly in eq. 8, but batched matmuls may round identical rows differently,
    and the normalisation of eq. 10 would blow that noise up to unit norm when *all* elements are
    identical. Pinning these costs to 0 keeps the maths exact (the uniform assignment results).
    Computed in row chunks so the ``(B, r, N, D)`` comparison stays bounded.
    """
    B, N, D = x.shape
    fast = _equal_pairs_by_hash(x)
    if fast is not None:
        return fast
    out = torch.empty(B, N, N, dtype=torch.bool, device=x.device)
    step = _rows_per_chunk(B, N, D)
    for i0 in range(0, N, step):
        i1 = min(N, i0 + step)
        out[:, i0:i1] = (x[:, i0:i1, None, :] == x[:, None, :, :]).all(-1)
    return out


def normalize_cost(C: Tensor, mask: Optional[Tensor] = None, eps: float = 1e-12) -> Tensor:
    """Eq. 10: divide each set's and channel's cost ``(B, K, N, N)`` by its Frobenius norm.

    Padded pairs are zero and so do not enter the norm. A zero cost (identical elements) stays
    zero: the norm is clamped at ``eps`` before the square root's argument, which keeps both the
    value and the gradient finite.
    """
    sq = C.pow(2).sum(dim=(-2, -1), keepdim=True)
    return C / sq.clamp_min(eps * eps).sqrt()


def ordering_cost(x: Tensor, first_weight: Tensor, first_bias: Optional[Tensor], hidden_layers: Sequence[nn.Linear],
                  last_weight: Tensor, mask: Optional[Tensor] = None, normalize: bool = True) -> Tensor:
    """Functional form of the ordering cost.

    Args:
        x: ``(B, N, D)`` elements (padded elements must already be finite, e.g. zeroed).
        first_weight: ``(H, 2D)`` weight of f's first layer on ``[x_i; x_j]``; ``first_bias`` ``(H,)``.
        hidden_layers: further ``Linear`` layers of f (each followed by ReLU) between first and last.
        last_weight: ``(K, H_last)``; a last-layer bias would cancel in ``g - g^T`` and is not used.
        mask: ``(B, N)`` bool, True = real element.
    Returns:
        ``(B, K, N, N)`` anti-symmetric cost, zero on padded pairs, unit Frobenius norm per set and
        channel when ``normalize``.
    """
    D = x.shape[-1]
    w_a, w_b = first_weight[:, :D], first_weight[:, D:]
    a = x @ w_a.t()                                   # W_a x_i, once per element
    c = x @ w_b.t()                                   # W_b x_j, once per element
    if first_bias is not None:
        a = a + first_bias
    if not hidden_layers:
        g = pairwise_two_layer(a, c, last_weight)                            # (B, N, N, K)
    else:
        h = torch.relu(a.unsqueeze(2) + c.unsqueeze(1))
        for layer in hidden_layers:
            h = torch.relu(layer(h))
        g = h @ last_weight.t()
    g = g.movedim(-1, 1)                              # (B, K, N, N)
    C = g - g.transpose(-1, -2)                       # eq. 8: exactly anti-symmetric, zero diagonal
    keep = ~equal_pairs(x.detach())                   # F(x_i, x_j) = 0 exactly when x_i == x_j
    pm = pair_mask(mask)
    if pm is not None:
        keep = keep & pm
    C = torch.where(keep.unsqueeze(1), C, torch.zeros((), dtype=C.dtype, device=C.device))
    if normalize:
        C = normalize_cost(C)
    return C


class PairwiseCost(nn.Module):
    """Learned anti-symmetric ordering cost ``C`` of a set (eq. 8-10).

    Args:
        in_features: element dimension D.
        hidden: hidden width of f (int), or a sequence of widths for a deeper f.
        channels: number K of cost matrices (1 for sequences, 2 for lattices: horizontal, vertical).

    Shapes: ``forward(x (B, N, D), mask (B, N) | None) -> C (B, K, N, N)``.
    """

    def __init__(self, in_features: int, hidden: Union[int, Sequence[int]] = 128, channels: int = 1,
                 normalize: bool = True):
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"hidden must be a positive int or a non-empty sequence of them, got {hidden!r}")
        self.in_features = in_features
        self.channels = channels
        self.normalize = normalize
        self.first = nn.Linear(2 * in_features, widths[0])
        self.hidden = nn.ModuleList(nn.Linear(w0, w1) for w0, w1 in zip(widths[:-1], widths[1:]))
        # The last layer's bias cancels in g - g^T (eq. 8); it is left out so that every parameter
        # is used (DistributedDataParallel rejects unused ones).
        self.last = nn.Linear(widths[-1], channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Paper appendix F: Xavier initialisation (the released code uses zero biases).
        for lin in [self.first, *self.hidden, self.last]:
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def pair_scores(self, x_i: Tensor, x_j: Tensor) -> Tensor:
        """``f(x_i, x_j)`` for explicit pairs ``(..., D)`` -> ``(..., K)`` (for plots and analysis)."""
        h = torch.relu(self.first(torch.cat([x_i, x_j], dim=-1)))
        for layer in self.hidden:
            h = torch.relu(layer(h))
        return self.last(h)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return ordering_cost(x, self.first.weight, self.first.bias, list(self.hidden), self.last.weight,
                             mask=mask, normalize=self.normalize)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, channels={self.channels}"
