"""The diagnosis's statistics, as pure functions of tensors: attention mass on a set of boxes, the Hungarian
order of a soft permutation, its per-set rank correlation with a box value, and P's relative entropy;
:data:`DEFINITIONS` says what each reported number means."""
from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np
import torch
from torch import Tensor

from setperm.functional import hungarian, permutation_entropy

MIN_CORRELATION_BOXES = 3   # a rank correlation of 2 points is always +-1
ORDER_STATS = ("spearman_x", "spearman_area", "spearman_x_asked", "spearman_area_asked")

# What each statistic of a diagnosis means (stored with it; a stored diagnosis is reused only with these)
DEFINITIONS = {
    "attention_mass": "share of a glimpse's (box, word) softmax attention on the boxes of the asked class, summed "
                      "over words; questions without such a box are left out",
    "chance": "share of the image's boxes that are of the asked class",
    "relevance": "mean weight sigmoid(relevance logit) the set encoder applies to the boxes of the asked class and "
                 "to the other boxes (BAN + LSTM / PO only)",
    "spearman": "Spearman rho of the Hungarian order of P with the box x-centre / area over all real boxes (or the "
                "asked class's boxes: *_asked); sets with < 3 boxes skipped; abs_mean = mean |rho|",
    "input_order": "the same rho for the feature file's box order (random in the synthetic set)",
    "entropy": "mean row entropy of P over real boxes (nats); relative = divided by log n"}


def attention_mass(att: Tensor, target: Tensor) -> Tensor:
    """Share of each glimpse's attention on the ``target`` boxes, summed over words.

    Args:
        att: (B, G, K, T) attention maps, each glimpse a distribution over the K x T (box, word) pairs.
        target: (B, K) bool, True = a box of the asked class.

    Returns:
        (B, G): ``sum_{i: target[b, i]} sum_j att[b, g, i, j]``, in [0, 1].
    """
    if not isinstance(att, Tensor) or att.dim() != 4:
        raise ValueError(f"att must be a tensor (B, G, K, T), got {_describe(att)}")
    if not isinstance(target, Tensor) or target.dtype != torch.bool or target.shape != (att.shape[0], att.shape[2]):
        raise ValueError(f"target must be a bool tensor (B, K) = {(att.shape[0], att.shape[2])}, "
                         f"got {_describe(target)}")
    return (att * target[:, None, :, None].to(att.dtype)).sum(dim=(2, 3))


def hard_positions(P: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Position of every element in the Hungarian order of ``P``.

    Args:
        P: (B, N, N) soft permutation, ``P[b, i, k]`` = weight of element i at position k.
        mask: (B, N) bool, True = real element (None: all real).

    Returns:
        (B, N) long: ``pos[b, i]`` = the position of element i in ``hungarian(P, mask)`` (real elements
        take positions 0 ... n - 1).
    """
    idx = hungarian(P, mask=mask)                       # idx[b, k] = element at position k
    pos = torch.empty_like(idx)
    pos.scatter_(1, idx, torch.arange(idx.shape[1], device=idx.device).expand_as(idx))
    return pos


def set_rank_correlation(positions: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Spearman rank correlation, per set, of the elements' positions with a per-element value.

    Args:
        positions: (B, N) position of each element in an order (e.g. :func:`hard_positions`).
        values: (B, N) float, e.g. the box x-centres.
        mask: (B, N) bool, the elements to correlate over (real boxes, or the asked class's boxes).

    Returns:
        (B,) float64 in [-1, 1]: the Pearson correlation of the ranks among the selected elements (average
        ranks for ties); nan for a set with fewer than 3 selected elements or constant values.
    """
    from scipy.stats import rankdata

    if positions.dim() != 2 or values.shape != positions.shape or mask.shape != positions.shape:
        raise ValueError(f"positions, values, mask must all be (B, N); got {tuple(positions.shape)}, "
                         f"{tuple(values.shape)}, {tuple(mask.shape)}")
    sel = mask.detach().cpu().numpy().astype(bool)
    if sel.size == 0:
        return torch.full((positions.shape[0],), math.nan, dtype=torch.float64)
    # unselected elements become nan, which rankdata leaves out of the ranking (one call for all sets)
    ranks = [rankdata(np.where(sel, t.detach().cpu().double().numpy(), np.nan), axis=1, nan_policy="omit")
             for t in (positions, values)]
    n = sel.sum(1)
    centred = [np.where(sel, r - (n[:, None] + 1) / 2, 0.0) for r in ranks]
    cov = (centred[0] * centred[1]).sum(1)
    denom = np.sqrt((centred[0] ** 2).sum(1) * (centred[1] ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where((n >= MIN_CORRELATION_BOXES) & (denom > 0), cov / np.where(denom > 0, denom, 1.0), np.nan)
    return torch.from_numpy(np.clip(rho, -1.0, 1.0))


def relative_entropy(P: Tensor, mask: Tensor) -> Tensor:
    """Mean row entropy of ``P`` (B, N, N) over real elements divided by ``log n`` (n real elements):
    0 for a hard permutation, 1 for the uniform one. (B,) float64, nan for n < 2."""
    n = mask.sum(1).double()
    ent = permutation_entropy(P.detach().double(), mask)
    return torch.where(n >= 2, ent / n.clamp_min(2).log(), torch.full_like(ent, math.nan))


def _describe(t) -> str:
    return f"shape {tuple(t.shape)} dtype {t.dtype}" if isinstance(t, Tensor) else type(t).__name__


def order_statistics(P: Optional[Tensor], mask: Tensor, asked: Tensor, x_centre: Tensor, area: Tensor,
                     G: int) -> Dict[str, Tensor]:
    """(B, G) rank correlations and entropies of the G glimpses' permutations ``P`` (B * G, K, K),
    set ``b * G + g`` being glimpse g of question b (``plugin.glimpse_sets``)."""
    B, K = mask.shape
    if P is None or P.shape != (B * G, K, K):
        raise RuntimeError(f"expected the set encoder's permutations (B * G, K, K) = {(B * G, K, K)}, got "
                           f"{None if P is None else tuple(P.shape)}")
    P = P.cpu()
    rep = lambda t: t.repeat_interleave(G, dim=0)                 # (B, K) -> (B * G, K), sets in b * G + g order
    m, a = rep(mask), rep(asked) & rep(mask)
    pos = hard_positions(P, m)
    out = {"spearman_x": set_rank_correlation(pos, rep(x_centre), m),
           "spearman_area": set_rank_correlation(pos, rep(area), m),
           "spearman_x_asked": set_rank_correlation(pos, rep(x_centre), a),
           "spearman_area_asked": set_rank_correlation(pos, rep(area), a),
           "entropy": permutation_entropy(P.double(), m),
           "entropy_relative": relative_entropy(P, m)}
    return {k: val.view(B, G) for k, val in out.items()}
