"""The set-to-vector tasks: what each answer is, computed on a padded batch.

Every set holds ``n`` elements with an integer ``value`` (the digit of an MNIST image, or the class of
a point) and, for the position tasks, an x-coordinate. The answers are vectorised over a padded
batch ``values (B, N)``, ``xs (B, N)``, ``mask (B, N)`` (True = real element); the tests check them
against a brute-force oracle on Python lists.

| task | family | elements | answer | output |
|---|---|---|---|---|
| sum | order-free | MNIST | sum of the digits (the DeepSets task) | count |
| max | order-free | MNIST | largest digit | class (10) |
| median | rank | MNIST | lower median: the ``(n - 1) // 2``-th smallest digit | class (10) |
| second | rank | MNIST | second-largest digit (the second of the digits sorted descending, repeats counted) | class (10) |
| leftmost | position | points | class of the element with the smallest x | class (10) |
| kth | position | points | class of the k-th element from the left (k = 3) | class (10) |
| left-of-max | position | points | number of elements left of the largest one (the largest class; among equals the leftmost) | count |
| unique | counting | MNIST | number of distinct digits (the Set Transformer's unique count) | count |

``count`` tasks are regressions (their answer grows with ``n``, so a fixed class list could not
extrapolate to the larger test sets); they are scored by the accuracy of the rounded prediction, and
by MAE. x-coordinates are continuous, so ties between them have probability 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

NUM_CLASSES = 10       # digits, and point classes
KTH = 3                # the "k-th element from the left" of the kth task (sets hold >= 5 elements)


@dataclass(frozen=True)
class Task:
    """``output``: ``"class"`` (cross-entropy over ``num_classes``) or ``"count"`` (regression on
    ``answer / scale``; ``scale`` is about the answer's spread at the training sizes)."""

    name: str
    family: str
    elements: str                       # "mnist" or "points"
    output: str
    answer: Callable[[Tensor, Optional[Tensor], Tensor], Tensor]
    num_classes: int = NUM_CLASSES
    scale: float = 1.0
    description: str = ""

    @property
    def out_features(self) -> int:
        return self.num_classes if self.output == "class" else 1


# ------------------------------------------------------------------------------ answers (B,) long
_BIG = 1 << 20


def _sorted_values(values: Tensor, mask: Tensor) -> Tensor:
    """Real values sorted ascending in the first n slots, padding (+BIG) after them."""
    return torch.where(mask, values, torch.full_like(values, _BIG)).sort(dim=1).values


def answer_sum(values: Tensor, xs: Optional[Tensor], mask: Tensor) -> Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum(1)


def answer_max(values: Tensor, xs: Optional[Tensor], mask: Tensor) -> Tensor:
    return torch.where(mask, values, torch.full_like(values, -_BIG)).max(1).values


def answer_median(values: Tensor, xs: Optional[Tensor], mask: Tensor) -> Tensor:
    n = mask.sum(1)
    return _sorted_values(values, mask).gather(1, ((n - 1) // 2).unsqueeze(1)).squeeze(1)


def answer_second(values: Tensor, xs: Optional[Tensor], mask: Tensor) -> Tensor:
    n = mask.sum(1)
    return _sorted_values(values, mask).gather(1, (n - 2).unsqueeze(1)).squeeze(1)


def _rank_by_x(xs: Tensor, mask: Tensor) -> Tensor:
    """Element indices sorted by x ascending, padding last."""
    return torch.where(mask, xs, torch.full_like(xs, float("inf"))).argsort(dim=1)


def answer_leftmost(values: Tensor, xs: Optional[Tensor], mask: Tensor) -> Tensor:
    return values.gather(1, _rank_by_x(xs, mask)[:, :1]).squeeze(1)


def answer_kth(values: Tensor, xs: Optional[Tensor], mask: Tensor) -> Tensor:
    return values.gather(1, _rank_by_x(xs, mask)[:, KTH - 1:KTH]).squeeze(1)


def answer_left_of_max(values: Tensor, xs: Optional[Tensor], mask: Tensor) -> Tensor:
    top = answer_max(values, xs, mask).unsqueeze(1)
    is_top = mask & (values == top)
    x_top = torch.where(is_top, xs, torch.full_like(xs, float("inf"))).min(1, keepdim=True).values
    return (mask & (xs < x_top)).sum(1)


def answer_unique(values: Tensor, xs: Optional[Tensor], mask: Tensor) -> Tensor:
    present = torch.zeros(values.shape[0], NUM_CLASSES + 1, dtype=torch.bool, device=values.device)
    present.scatter_(1, torch.where(mask, values, torch.full_like(values, NUM_CLASSES)), True)
    return present[:, :NUM_CLASSES].sum(1)


TASKS: Dict[str, Task] = {t.name: t for t in (
    Task("sum", "order-free", "mnist", "count", answer_sum, scale=10.0, description="sum of the digits"),
    Task("max", "order-free", "mnist", "class", answer_max, description="largest digit"),
    Task("median", "rank", "mnist", "class", answer_median, description="lower median digit"),
    Task("second", "rank", "mnist", "class", answer_second, description="second-largest digit"),
    Task("leftmost", "position", "points", "class", answer_leftmost, description="class of the leftmost point"),
    Task("kth", "position", "points", "class", answer_kth, description=f"class of the {KTH}rd point from the left"),
    Task("left-of-max", "position", "points", "count", answer_left_of_max, scale=2.0,
         description="points left of the largest-class point"),
    Task("unique", "counting", "mnist", "count", answer_unique, scale=2.0, description="number of distinct digits"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]
