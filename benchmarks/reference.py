"""A straightforward implementation of the paper's equations, the baseline of every speed-up.

Written from the paper (Zhang, Hare & Prugel-Bennett, ICLR 2019: section 2.1-2.4, algorithm 1,
appendix B) the way the released code computes, so the ratios we publish compare against the
paper's cost profile rather than a strawman:

- eq. 8-10: every ordered pair is materialised as the concatenation ``[x_i; x_j]``
  ``(B, N, N, 2D)``, the pairwise MLP ``f`` runs on **both** orders ``[x_i; x_j]`` and
  ``[x_j; x_i]``, and ``C = f(pairs) - f(swapped pairs)`` is divided by its Frobenius norm per set
  and channel. The MLP is ``nn.Linear`` on channels-last pairs by default (``layout="linear"``);
  ``layout="conv1d"`` runs ``nn.Conv1d(kernel_size=1)`` on channels-first ``(B, 2D, N*N)`` pairs as
  the released code does (slower on CPU, same maths);
- appendix B: the plain (non-log) Sinkhorn operator, ``exp`` followed by ``L`` rounds of row then
  column normalisation (the first ``exp`` + row normalisation is a softmax, which keeps ``exp`` from
  overflowing, exactly as the released code does);
- eq. 4: the closed-form gradient ``2 C B`` with ``B_jq = sum_{k'>q} P_jk' - sum_{k'<q} P_jk'`` from
  a cumulative sum and a reversed cumulative sum; the lattice gradient (section 2.4) loops over
  the grid's rows and columns;
- algorithm 1 / eq. 7: ``T`` unrolled steps ``P~ <- P~ - |eta| dc/dP`` at ``P = S(P~)``, then
  ``S(P~)``; the set is permuted by the broadcast product ``y_k = sum_i P_ik x_i``
  (materialising ``(B, N, N, D)``, as the released ``apply_assignment`` does);
- the set encoder (F.4): an LSTM over the **full** padded sequence and its last cell state.

There is no masking anywhere: the benchmarks use full sets. Weights are copied from setperm's
modules (:func:`reference_from_setperm`), so outputs can be compared element by element.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["ReferencePairwiseCost", "ReferencePermutationOptimization", "ReferenceSetEncoder", "plain_sinkhorn",
           "reference_gradient", "reference_lattice_gradient", "reference_from_setperm"]


class ReferencePairwiseCost(nn.Module):
    """Eq. 8-10 on materialised pairs, MLP run on both orders.

    ``forward(x (B, N, D)) -> C (B, K, N, N)``.
    """

    def __init__(self, in_features: int, hidden: int, channels: int = 1, layout: str = "linear"):
        super().__init__()
        if layout not in ("linear", "conv1d"):
            raise ValueError(f"layout must be 'linear' or 'conv1d', got {layout!r}")
        self.layout = layout
        self.channels = channels
        if layout == "linear":
            self.f = nn.Sequential(nn.Linear(2 * in_features, hidden), nn.ReLU(), nn.Linear(hidden, channels))
        else:
            self.f = nn.Sequential(nn.Conv1d(2 * in_features, hidden, 1), nn.ReLU(), nn.Conv1d(hidden, channels, 1))

    def _f(self, pairs: Tensor) -> Tensor:
        B, N, _, D2 = pairs.shape
        if self.layout == "linear":
            return self.f(pairs)                                         # (B, N, N, K)
        # channels-first (B, 2D, N*N), the released code's Conv1d(k=1) "Conv1" layer
        out = self.f(pairs.permute(0, 3, 1, 2).reshape(B, D2, N * N))
        return out.view(B, self.channels, N, N).permute(0, 2, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, N, D = x.shape
        xi = x.unsqueeze(2).expand(B, N, N, D)                           # x_i at [b, i, j]
        xj = x.unsqueeze(1).expand(B, N, N, D)                           # x_j at [b, i, j]
        g = self._f(torch.cat([xi, xj], dim=-1))                         # f(x_i, x_j)
        g_swapped = self._f(torch.cat([xj, xi], dim=-1))                 # f(x_j, x_i), second MLP pass
        C = (g - g_swapped).permute(0, 3, 1, 2)                          # eq. 8, (B, K, N, N)
        norm = C.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()          # eq. 10
        return C / norm.clamp_min(1e-12)


def plain_sinkhorn(logits: Tensor, iters: int = 4, temperature: float = 1.0) -> Tensor:
    """Appendix B, eq. 11-15: ``exp`` then ``iters`` rounds of rows-then-columns normalisation."""
    P = torch.softmax(logits / temperature, dim=-1)                      # T_r(exp(X)) without overflow
    for it in range(iters):
        if it > 0:
            P = P / P.sum(-1, keepdim=True).clamp_min(1e-12)             # T_r: rows
        P = P / P.sum(-2, keepdim=True).clamp_min(1e-12)                 # T_c: columns
    return P


def _balance(P: Tensor) -> Tensor:
    """``B_jq = sum_{k'>q} P_jk' - sum_{k'<q} P_jk'`` along the last dim."""
    before = torch.cumsum(P, -1) - P                                     # sum_{k'<q}
    after = torch.flip(torch.cumsum(torch.flip(P, [-1]), -1), [-1]) - P  # sum_{k'>q}
    return after - before


def reference_gradient(P: Tensor, C: Tensor) -> Tensor:
    """Eq. 4: ``2 C B`` for ``C`` (B, N, N) and ``P`` (B, N, M)."""
    return 2 * torch.bmm(C, _balance(P))


def reference_lattice_gradient(P: Tensor, C: Tensor, grid: Tuple[int, int]) -> Tensor:
    """Section 2.4: sum of eq. 4 over every grid row (channel 0) and column (channel 1), one by one.

    Positions are row-major (``k = r * cols + c``)."""
    rows, cols = grid
    grad = torch.zeros_like(P)
    for r in range(rows):                                                # left-to-right within row r
        pos = torch.arange(r * cols, (r + 1) * cols, device=P.device)
        grad[:, :, pos] += reference_gradient(P[:, :, pos], C[:, 0])
    for c in range(cols):                                                # top-to-bottom within column c
        pos = torch.arange(c, rows * cols, cols, device=P.device)
        grad[:, :, pos] += reference_gradient(P[:, :, pos], C[:, 1])
    return grad


class ReferencePermutationOptimization(nn.Module):
    """Algorithm 1 with PO-U (``P~ = 0``) or PO-LA (``P~_ik = w_k . x_i``, ``num_positions`` given).

    ``forward(x (B, N, D)) -> P (B, N, N)``.
    """

    def __init__(self, in_features: int, cost_hidden: int, steps: int, grid: Optional[Tuple[int, int]] = None,
                 sinkhorn_iters: int = 4, num_positions: Optional[int] = None, layout: str = "linear"):
        super().__init__()
        self.steps = steps
        self.grid = grid
        self.sinkhorn_iters = sinkhorn_iters
        self.cost = ReferencePairwiseCost(in_features, cost_hidden, 2 if grid else 1, layout=layout)
        self.position_weight = (nn.Parameter(torch.zeros(num_positions, in_features))
                                if num_positions is not None else None)
        self.eta = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.optimize(self.cost(x), x)

    def optimize(self, C: Tensor, x: Tensor) -> Tensor:
        """Algorithm 1 lines 5-11 for a given normalised cost ``C`` (B, K, N, N)."""
        B, N, _ = x.shape
        if self.position_weight is None:
            logits = x.new_zeros(B, N, N)                                # PO-U
        else:
            logits = x @ self.position_weight[:N].t()                    # PO-LA, eq. 6
        eta = self.eta.abs()
        for _ in range(self.steps):
            P = plain_sinkhorn(logits, self.sinkhorn_iters)
            if self.grid is None:
                grad = reference_gradient(P, C[:, 0])
            else:
                grad = reference_lattice_gradient(P, C, self.grid)
            logits = logits - eta * grad                                 # eq. 7
        return plain_sinkhorn(logits, self.sinkhorn_iters)


def reference_permute(x: Tensor, P: Tensor) -> Tensor:
    """``y_k = sum_i P_ik x_i`` as a broadcast product (materialises ``(B, N, N, D)``)."""
    return (P.unsqueeze(-1) * x.unsqueeze(2)).sum(1)


class ReferenceSetEncoder(nn.Module):
    """PO-U, permute, LSTM over the full sequence, last cell state (F.4).

    ``forward(x (B, N, D), weights (B, N) logits | None) -> h (B, hidden_size)``.
    """

    def __init__(self, in_features: int, hidden_size: int, cost_hidden: int, steps: int, sinkhorn_iters: int = 4,
                 layout: str = "linear"):
        super().__init__()
        self.po = ReferencePermutationOptimization(in_features, cost_hidden, steps, sinkhorn_iters=sinkhorn_iters,
                                                   layout=layout)
        self.lstm = nn.LSTM(in_features, hidden_size, batch_first=True)

    def forward(self, x: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        P = self.po(x)
        if weights is not None:
            x = x * torch.sigmoid(weights).unsqueeze(-1)                 # relevance weighting (F.4)
        _, (_, c_n) = self.lstm(reference_permute(x, P))
        return c_n[-1]


@torch.no_grad()
def _load_cost(ref: ReferencePairwiseCost, cost: nn.Module) -> None:
    """setperm's ``PairwiseCost``: ``first`` = Linear(2D, H) on ``[x_i; x_j]``, ``last`` = Linear(H, K)
    without bias (a last-layer bias cancels in eq. 8, so the reference's is set to zero)."""
    if len(getattr(cost, "hidden", [])) != 0:
        raise ValueError("the reference implements the two-layer f of the paper only")
    first, last = ref.f[0], ref.f[2]
    first.weight.copy_(cost.first.weight.view_as(first.weight))
    first.bias.copy_(cost.first.bias)
    last.weight.copy_(cost.last.weight.view_as(last.weight))
    last.bias.zero_()


@torch.no_grad()
def _load_po(ref: ReferencePermutationOptimization, po: nn.Module) -> None:
    if po.cost is None:
        raise ValueError("the reference needs steps >= 1 (a pairwise cost)")
    _load_cost(ref.cost, po.cost)
    ref.eta.copy_(po.eta_param.detach())
    if po.linear is not None:
        if po.linear.clip is not None:
            raise ValueError("the reference does not clip the linear-assignment logits")
        ref.position_weight.copy_(po.linear.weight)
    if ref.steps != po.steps or ref.grid != po.grid or ref.sinkhorn_iters != po.sinkhorn_iters:
        raise ValueError("reference and setperm optimiser configurations differ")
    if po.temperature != 1.0:
        raise ValueError("the reference runs at temperature 1 (the paper's setting)")


def reference_from_setperm(module: nn.Module, layout: str = "linear") -> nn.Module:
    """Build the reference twin of a setperm ``PermutationOptimization`` or ``PermutationSetEncoder``
    (same configuration, same weights, same dtype and device)."""
    from setperm import PermutationOptimization, PermutationSetEncoder

    if isinstance(module, PermutationSetEncoder):
        if module.po is None or module.po.permutation != "po-u":
            raise ValueError("the reference encoder implements PO-U only")
        po = module.po
        hidden = po.cost.first.out_features
        ref = ReferenceSetEncoder(module.in_features, module.hidden_size, hidden, po.steps, po.sinkhorn_iters,
                                  layout=layout)
        _load_po(ref.po, po)
        ref.lstm.load_state_dict(module.lstm.state_dict())
    elif isinstance(module, PermutationOptimization):
        hidden = module.cost.first.out_features if module.cost is not None else 1
        ref = ReferencePermutationOptimization(module.in_features, hidden, module.steps, grid=module.grid,
                                               sinkhorn_iters=module.sinkhorn_iters,
                                               num_positions=(None if module.linear is None
                                                              else module.linear.num_positions), layout=layout)
        _load_po(ref, module)
    else:
        raise ValueError(f"module must be a setperm PermutationOptimization or PermutationSetEncoder, got "
                         f"{type(module).__name__}")
    p = next(module.parameters())
    return ref.to(device=p.device, dtype=p.dtype)
