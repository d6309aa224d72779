"""The counting component of Zhang, Hare & Prugel-Bennett, "Learning to Count Objects in Natural Images
for Visual Question Answering" (ICLR 2018), as used by BAN (Kim et al. 2018, section 4.3).

From the top-n object proposals and their attention weights ``a`` it builds a graph whose edges are
``A = a a^T``, removes intra-object duplicates (overlapping boxes, distance ``D = 1 - IoU``) and
inter-object duplicates (proposals whose rows of the graph look alike), reads the count off as the
square root of the remaining edge weight and returns it as a linearly interpolated one-hot vector
scaled by a confidence. Every non-linearity is a learned monotone piecewise-linear function
``f_1 ... f_8`` on [0, 1] (paper section 4, eq. numbers follow the paper's order).

Parameter names and shapes match the official module (``f`` = 16 piecewise-linear functions of 16
segments, of which the paper's eight are ``f[0] ... f[7]``; the others exist only so official
checkpoints load with ``strict=True``). The unused ``f[8:]`` are frozen (``requires_grad=False``):
they never receive a gradient, and DistributedDataParallel would otherwise wait for one and fail at
the second step (official training never changes them either).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["piecewise_linear", "box_iou", "interpolated_one_hot", "PiecewiseLin", "Counter",
           "freeze_unused_functions", "USED_FUNCTIONS"]

USED_FUNCTIONS = 8  # f_1 ... f_8 of the counting paper


def piecewise_linear(x: Tensor, weight: Tensor) -> Tensor:
    """The monotone piecewise-linear activation of the counting paper (section 4, "Piecewise linear").

    ``weight`` (n + 1,): segment slopes ``|w| / sum |w|`` (``w_0`` is kept at 0, so ``f(0) = 0``
    and ``f(1) = 1``). For ``x`` in [0, 1], with ``y = n x``, ``f(x) = sum_{k <= floor(y)} w_k +
    frac(y) w_{floor(y) + 1}``: a cumulative sum read at the segment plus the partial segment.
    Any shape of ``x``; returns the same shape.
    """
    n = weight.numel() - 1
    w = weight.abs()
    w = w / w.sum()
    csum = torch.cumsum(w, 0)
    y = n * x
    seg = y.long()  # truncation, as .frac() below; inputs are in [0, 1]
    frac = y.frac()
    seg = seg.clamp(0, n)
    return _lookup(csum, seg) + frac * _lookup(w, (seg + 1).clamp(max=n))


def _lookup(table: Tensor, idx: Tensor) -> Tensor:
    """``table[idx]`` for a 1-d ``table``: the same values, and gradients equal up to the order of
    the sums, without advanced indexing, whose backward scatter (index_put with accumulate) is slow
    when several OpenMP threads contend for few cores. On the CPU as an ``index_select``, whose
    backward (``index_add_``) is the faster one there (benchmarks/README.md, "The counter's
    look-ups"); elsewhere as an embedding look-up, whose CUDA backward sums in a fixed order
    (``index_add_`` there uses atomics)."""
    if table.device.type == "cpu":
        return table.index_select(0, idx.reshape(-1)).view(idx.shape)
    return F.embedding(idx, table.unsqueeze(1)).squeeze(-1)


def box_iou(boxes: Tensor) -> Tensor:
    """Pairwise intersection over union. ``boxes`` (B, 4, M) as (x1, y1, x2, y2) -> (B, M, M)."""
    lo = torch.maximum(boxes[:, :2, :, None], boxes[:, :2, None, :])  # (B, 2, M, M)
    hi = torch.minimum(boxes[:, 2:, :, None], boxes[:, 2:, None, :])
    side = (hi - lo).clamp(min=0)
    inter = side[:, 0] * side[:, 1]
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    area = wh[:, 0] * wh[:, 1]  # (B, M)
    # 1e-12 keeps degenerate (zero-area, e.g. padded) boxes at IoU 0 instead of 0/0
    return inter / (area[:, :, None] + area[:, None, :] - inter + 1e-12)


def interpolated_one_hot(count: Tensor, objects: int) -> Tensor:
    """Counting paper, "Output": ``count`` (B,) in [0, objects] -> (B, objects + 1), linear
    interpolation between the one-hot vectors of floor(count) and floor(count) + 1 (e.g. 2.75 ->
    0.25 at index 2 and 0.75 at index 3), so the gradient reaches the count through the fraction."""
    count = count.clamp(0, objects)
    low = count.long()
    frac = count.frac().unsqueeze(1)
    idx = torch.arange(objects + 1, device=count.device)
    at_low = (idx == low.unsqueeze(1)).to(count.dtype)
    at_high = (idx == (low + 1).clamp(max=objects).unsqueeze(1)).to(count.dtype)
    return (1 - frac) * at_low + frac * at_high


def freeze_unused_functions(counter: nn.Module) -> None:
    """``requires_grad=False`` on ``counter.f[8:]`` (this module's or the official Counter's): they
    are not used by the forward, and DDP needs every trainable parameter to get a gradient."""
    for f in list(counter.f)[USED_FUNCTIONS:]:
        f.requires_grad_(False)


class PiecewiseLin(nn.Module):
    """A learned monotone piecewise-linear function on [0, 1] with ``n`` segments (parameter ``weight``)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        weight = torch.ones(n + 1)
        weight[0] = 0  # |w|' = sign(0) = 0: stays 0 for ever, which pins f(0) = 0
        self.weight = nn.Parameter(weight)

    def forward(self, x: Tensor) -> Tensor:
        return piecewise_linear(x, self.weight)


class Counter(nn.Module):
    """Counting component (Zhang et al. 2018), shared by BAN's glimpses.

    Args:
        objects: n, the number of highest-attention proposals considered (BAN: 10). The output
            has n + 1 entries (counts 0 ... n).
        already_sigmoided: the attention given to ``forward`` is already in [0, 1].

    Shapes:
        ``forward(boxes (B, 4, K) as x1, y1, x2, y2, attention (B, K) logits) -> (B, objects + 1)``.
        Proposals with -inf logits (BAN's padded boxes) get weight sigmoid(-inf) = 0. Sets with
        K < objects are completed with such empty proposals (the official module requires K >= n);
        the result equals that of the same set zero-padded to ``objects`` boxes.
    """

    def __init__(self, objects: int, already_sigmoided: bool = False):
        super().__init__()
        self.objects = objects
        self.already_sigmoided = already_sigmoided
        self.f = nn.ModuleList([PiecewiseLin(16) for _ in range(16)])
        freeze_unused_functions(self)

    def top_proposals(self, boxes: Tensor, attention: Tensor) -> Tuple[Tensor, Tensor]:
        """Keep the n proposals of largest attention (low-attention ones barely change the count)."""
        B, _, K = boxes.shape
        if K < self.objects:
            empty = 0.0 if self.already_sigmoided else float("-inf")
            boxes = torch.cat([boxes, boxes.new_zeros(B, 4, self.objects - K)], 2)
            attention = torch.cat([attention, attention.new_full((B, self.objects - K), empty)], 1)
        attention, idx = attention.topk(self.objects, dim=1, sorted=False)
        boxes = boxes.gather(2, idx.unsqueeze(1).expand(B, 4, self.objects))
        return boxes, attention

    def forward(self, boxes: Tensor, attention: Tensor) -> Tensor:
        if boxes.dim() != 3 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (B, 4, K), got {tuple(boxes.shape)}")
        if attention.shape != (boxes.shape[0], boxes.shape[2]):
            raise ValueError(f"attention must have shape (B, K) = {(boxes.shape[0], boxes.shape[2])}, "
                             f"got {tuple(attention.shape)}")
        f = self.f
        boxes, a = self.top_proposals(boxes, attention)
        if not self.already_sigmoided:
            a = torch.sigmoid(a)
        A = a.unsqueeze(2) * a.unsqueeze(1)  # graph of attention edges, A_ij = a_i a_j
        D = 1 - box_iou(boxes)  # distance between proposals

        # intra-object deduplication: edges between overlapping proposals of one object vanish
        score = f[0](A) * f[1](D)

        # inter-object deduplication: proposals i, j are duplicates when their attention and their
        # whole rows of X = f_4(A) f_5(D) agree; each proposal is scaled by 1 / (its number of duplicates)
        X = f[3](A) * f[4](D)
        row_sim = f[2](1 - (X.unsqueeze(2) - X.unsqueeze(1)).abs()).prod(dim=3)  # (B, i, j): prod over k
        sim = row_sim * f[2](1 - (a.unsqueeze(2) - a.unsqueeze(1)).abs())
        s = 1 / sim.sum(dim=2)  # (B, n)
        score = score * (s.unsqueeze(2) * s.unsqueeze(1))

        # self-loops: D_ii = 0 removed the diagonal above; add back f_1(a_i a_i) once per proposal
        diag = f[0](a * a) * s
        total = score.sum(dim=(1, 2)) + diag.sum(dim=1)
        # a complete graph of c proposals with self-loops has c^2 edges
        count = (total + 1e-20).sqrt()
        one_hot = interpolated_one_hot(count, self.objects)

        # confidence: how far the attention and distances are from the uncertain value 0.5
        p_a = (f[5](a) - 0.5).abs().mean(dim=1)
        p_d = (f[6](D) - 0.5).abs().mean(dim=(1, 2))
        confidence = f[7](p_a + p_d)
        return one_hot * confidence.unsqueeze(1)

    def extra_repr(self) -> str:
        return f"objects={self.objects}, already_sigmoided={self.already_sigmoided}"
