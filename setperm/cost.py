"""Pairwise anti-symmetric ordering cost (paper section 2.3, eq. 8-10).

``C_ij = F(x_i, x_j) = f(x_i, x_j) - f(x_j, x_i)`` with ``f`` a small MLP on the concatenated
pair ``[x_i; x_j]``, then ``C / ||C||_F`` per set and per cost channel.

Two facts make this cheap:
- the first layer of ``f`` on ``[x_i; x_j]`` is ``W_a x_i + W_b x_j + b``: the two projections are
  computed once per element and broadcast, the ``(B, N, N, 2D)`` pairs are never built;
- ``g_ij = f(x_i, x_j)`` is evaluated once and ``C = g - g^T``; ``f`` is not run twice.
For the common two-layer ``f`` a custom autograd function (:mod:`setperm.pairwise`) evaluates
``g`` and recomputes the ``(B, N, N, hidden)`` activations in backward instead of storing them, so
memory grows as ``N^2 * K`` rather than ``N^2 * hidden``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .masking import pair_mask
from .pairwise import _rows_per_chunk, check_kernel, pairwise_two_layer


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
                  last_weight: Tensor, mask: Optional[Tensor] = None, normalize: bool = True,
                  kernel: str = "chunked") -> Tensor:
    """Functional form of the ordering cost.

    Args:
        x: ``(B, N, D)`` elements (padded elements must already be finite, e.g. zeroed).
        first_weight: ``(H, 2D)`` weight of f's first layer on ``[x_i; x_j]``; ``first_bias`` ``(H,)``.
        hidden_layers: further ``Linear`` layers of f (each followed by ReLU) between first and last.
        last_weight: ``(K, H_last)``; a last-layer bias would cancel in ``g - g^T`` and is not used.
        mask: ``(B, N)`` bool, True = real element.
        kernel: ``"chunked"`` or ``"compiled"`` evaluation of a two-layer ``f`` (see
            :func:`setperm.pairwise_two_layer`); a deeper ``f`` needs ``"chunked"``.
    Returns:
        ``(B, K, N, N)`` anti-symmetric cost, zero on padded pairs, unit Frobenius norm per set and
        channel when ``normalize``.
    """
    check_kernel(kernel)
    if hidden_layers and kernel != "chunked":
        raise ValueError(f"kernel={kernel!r} supports a two-layer f only (one hidden width); got "
                         f"{len(hidden_layers)} further hidden layer(s): use kernel='chunked'")
    D = x.shape[-1]
    w_a, w_b = first_weight[:, :D], first_weight[:, D:]
    a = x @ w_a.t()                                   # W_a x_i, once per element
    c = x @ w_b.t()                                   # W_b x_j, once per element
    if first_bias is not None:
        a = a + first_bias
    if not hidden_layers:
        g = pairwise_two_layer(a, c, last_weight, kernel)                          # (B, N, N, K)
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
        kernel: ``"chunked"`` (default) or ``"compiled"`` (torch.compile-fused pairwise MLP, several
            times faster, compiles on first use; two-layer f only), see :mod:`setperm.pairwise`.

    Shapes: ``forward(x (B, N, D), mask (B, N) | None) -> C (B, K, N, N)``.
    """

    def __init__(self, in_features: int, hidden: Union[int, Sequence[int]] = 128, channels: int = 1,
                 normalize: bool = True, kernel: str = "chunked"):
        super().__init__()
        check_kernel(kernel)
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        if not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"hidden must be a positive int or a non-empty sequence of them, got {hidden!r}")
        if len(widths) > 1 and kernel != "chunked":
            raise ValueError(f"kernel={kernel!r} supports a two-layer f only (one hidden width), got hidden={hidden!r}")
        self.in_features = in_features
        self.channels = channels
        self.normalize = normalize
        self.kernel = kernel
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
                             mask=mask, normalize=self.normalize, kernel=self.kernel)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, channels={self.channels}, kernel={self.kernel!r}"
