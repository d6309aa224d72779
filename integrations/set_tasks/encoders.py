"""The encoder zoo: PyG's maintained set aggregations as the baselines, setperm's encoder as ours.

Every encoder maps the embedded elements ``h (B, N, D)`` with ``mask (B, N)`` (True = real element)
to a set vector ``(B, width)``. The baselines are ``torch_geometric.nn.aggr`` modules, called on
PyG's sparse batch form (``h[mask]`` and the set index of every element); none is written here:

| name | module | notes |
|---|---|---|
| deepsets | ``DeepSetsAggregation`` | phi = Linear-ReLU-Linear-ReLU, sum, rho = Linear-ReLU |
| set-transformer | ``Linear(D, W)`` + ``SetTransformerAggregation(W)`` | 2 SABs, PMA with 1 seed, 1 SAB, 4 heads |
| lstm | ``LSTMAggregation(D, W)`` | reads the given (random) order; PyG's last output over the padded batch |
| gru | ``GRUAggregation(D, W)`` | as lstm |
| sort | ``SortAggregation(k)`` + ``Linear(k D, W)``-ReLU | sorts by the embedding's last channel, keeps k |
| attention | ``AttentionalAggregation`` | gate Linear-ReLU-Linear(1), nn Linear-ReLU-Linear |
| lstm-only | ``PermutationSetEncoder(D, W, None)`` | setperm's LSTM on the given order (packed) |
| po-u | ``PermutationSetEncoder(D, W, PermutationOptimization(D, ...))`` | PO-U + LSTM (paper section 4.4) |
| po-u-w | po-u with relevance weights | logits from ``Linear(D, 1)``, elements scaled by their sigmoid (F.4) |
| po-la | po-u with ``PermutationOptimization(permutation="po-la")`` | PO-LA, ``num_positions`` = the largest training size |
| po-u-st | po-u with ``straight_through=True`` | the LSTM reads the Hungarian (hard) order, gradients through the soft P |
| po-la-st | po-la with ``straight_through=True`` | likewise |
| po-u-sum | po-u with ``pool="sum"`` | the LSTM state plus a linear map of the sum of the elements |
| po-u-mean | po-u with ``pool="mean"`` | likewise with the mean |
| po-u-st-sum | po-u-st with ``pool="sum"`` | hard order and sum pooling |
| po-u-st-mean | po-u-st with ``pool="mean"`` | hard order and mean pooling |
| po-u-att | po-u with ``pool="attention"`` | the LSTM state plus a linear map of the softmax-weighted mean |
| po-u-gru | po-u with ``rnn="gru"`` | a GRU reads the order (its last hidden state) |
| po-u-st-gru | po-u-st with ``rnn="gru"`` | hard order read by a GRU |

``width`` (W) is each encoder's free size; :func:`match_width` picks it so that whole models have
about the same number of parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from setperm import PermutationOptimization, PermutationSetEncoder

BASELINES = ("deepsets", "set-transformer", "lstm", "gru", "sort", "attention")
# Our encoders are named base[-w][-st][-sum|-mean|-att|-gru]: PO-U / PO-LA / no permutation, relevance weights,
# the straight-through hard order, a pooled term beside the LSTM state or a GRU reader (see build_encoder).
OURS = ("lstm-only", "po-u", "po-u-w", "po-la", "po-u-st", "po-la-st", "po-u-sum", "po-u-mean", "po-u-st-sum",
        "po-u-st-mean", "po-u-gru", "po-u-st-gru", "po-u-att")
ENCODERS = BASELINES + OURS
# The suite's default: PyG's aggregations, the LSTM-only ablation, the paper's PO-U and the settings recommended
# for the task families (RECOMMENDED); the other variants are run by naming them in --encoders.
DEFAULT_ENCODERS = BASELINES + ("lstm-only", "po-u", "po-u-st", "po-u-sum", "po-u-att", "po-u-st-gru")
# Permutation invariant by construction; the others read the elements in the given order.
INVARIANT = tuple(e for e in ENCODERS if e not in ("lstm", "gru", "lstm-only"))
# The setting the README recommends for each task family (measured in this suite, see its README).
RECOMMENDED = {"position": "po-u", "order-free": "po-u-st", "rank": "po-u-st", "counting": "po-u-st-gru"}
HEADS = 4                # attention heads of the Set Transformer (its width must be a multiple)


@dataclass(frozen=True)
class EncoderConfig:
    """What the encoders need to know besides their width.

    ``max_train_size``: the sort pooling's k and PO-LA's number of positions; ``cost_hidden``,
    ``steps``: PO's pairwise-MLP width and inner steps T (paper F.4: 128 and 3 for VQA)."""

    max_train_size: int = 10
    cost_hidden: int = 32
    steps: int = 4


class PygReadout(nn.Module):
    """A PyG aggregation on the sparse form of a padded batch: ``pre`` per element, ``aggr``, ``post``.

    Shapes: ``forward(h (B, N, D), mask (B, N)) -> (B, W)``."""

    def __init__(self, aggr: nn.Module, pre: Optional[nn.Module] = None, post: Optional[nn.Module] = None):
        super().__init__()
        self.pre, self.aggr, self.post = pre, aggr, post

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        flat = h[mask]                        # row-major: the elements of set 0, then set 1, ...
        index = mask.nonzero()[:, 0]          # so the set index is sorted, as PyG requires
        if self.pre is not None:
            flat = self.pre(flat)
        out = self.aggr(flat, index, dim_size=h.shape[0])
        return self.post(out) if self.post is not None else out


class SetpermReadout(nn.Module):
    """setperm's encoder, optionally with relevance logits ``Linear(D, 1)`` of every element.

    Shapes: ``forward(h (B, N, D), mask (B, N), return_permutation) -> (B, W)`` [and ``P (B, N, N)``]."""

    def __init__(self, encoder: PermutationSetEncoder, relevance: bool = False):
        super().__init__()
        self.encoder = encoder
        self.relevance = nn.Linear(encoder.in_features, 1) if relevance else None

    def forward(self, h: Tensor, mask: Tensor, return_permutation: bool = False):
        weights = self.relevance(h).squeeze(-1) if self.relevance is not None else None
        return self.encoder(h, mask=mask, weights=weights, return_permutation=return_permutation)


def build_encoder(name: str, dim: int, width: int, cfg: EncoderConfig) -> nn.Module:
    """Encoder ``name`` for elements of size ``dim`` with free size ``width``; output ``(B, width)``."""
    from torch_geometric.nn import aggr as pyg

    if name not in ENCODERS:
        raise ValueError(f"encoder: expected one of {ENCODERS}, got {name!r}")
    W = width
    if name == "deepsets":
        return PygReadout(pyg.DeepSetsAggregation(
            local_nn=nn.Sequential(nn.Linear(dim, W), nn.ReLU(), nn.Linear(W, W), nn.ReLU()),
            global_nn=nn.Sequential(nn.Linear(W, W), nn.ReLU())))
    if name == "set-transformer":
        if W % HEADS:
            raise ValueError(f"width: the Set Transformer needs a multiple of {HEADS}, got {W}")
        return PygReadout(pyg.SetTransformerAggregation(W, num_seed_points=1, num_encoder_blocks=2,
                                                        num_decoder_blocks=1, heads=HEADS),
                          pre=nn.Linear(dim, W))
    if name == "lstm":
        return PygReadout(pyg.LSTMAggregation(dim, W))
    if name == "gru":
        return PygReadout(pyg.GRUAggregation(dim, W))
    if name == "sort":
        k = cfg.max_train_size
        return PygReadout(pyg.SortAggregation(k), post=nn.Sequential(nn.Linear(k * dim, W), nn.ReLU()))
    if name == "attention":
        return PygReadout(pyg.AttentionalAggregation(
            gate_nn=nn.Sequential(nn.Linear(dim, W), nn.ReLU(), nn.Linear(W, 1)),
            nn=nn.Sequential(nn.Linear(dim, W), nn.ReLU(), nn.Linear(W, W))))
    words = name.split("-")
    permutation = "none" if name == "lstm-only" else "-".join(words[:2])     # "po-u" / "po-la"
    parts = words[2:] if permutation != "none" else []                      # w, st, sum / mean
    pool = {"sum": "sum", "mean": "mean", "att": "attention"}.get(parts[-1]) if parts else None
    po = None
    if permutation != "none":
        # check_finite=False: the encoder checks its input itself, once
        po = PermutationOptimization(dim, cost_hidden=cfg.cost_hidden, steps=cfg.steps, permutation=permutation,
                                     num_positions=cfg.max_train_size if permutation == "po-la" else None,
                                     check_finite=False)
    encoder = PermutationSetEncoder(dim, W, po, straight_through="st" in parts, pool=pool,
                                    rnn="gru" if "gru" in parts else "lstm")
    return SetpermReadout(encoder, relevance="w" in parts)


def max_set_size(name: str, cfg: EncoderConfig) -> Optional[int]:
    """The largest set the encoder accepts (PO-LA: its number of positions), None if unbounded."""
    return cfg.max_train_size if name in ("po-la", "po-la-st") else None


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def match_width(name: str, target: int, total_params, widths=range(4, 513, 4)) -> Tuple[int, int]:
    """The width whose whole model has the parameter count closest to ``target``.

    ``total_params(name, width) -> int`` counts the whole model (element MLP, encoder, head).
    Returns ``(width, count)``."""
    best: Optional[Tuple[int, int]] = None
    for w in widths:
        n = total_params(name, w)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (w, n)
        if n > target and best[1] != n:
            break               # counts grow with the width: nothing closer beyond this point
    return best


def parameter_table(counts: Dict[str, int], target: int) -> Dict[str, float]:
    """Relative deviation of every encoder's parameter count from ``target``."""
    return {k: (v - target) / target for k, v in counts.items()}
