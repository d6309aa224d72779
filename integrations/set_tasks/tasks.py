"""The set-to-vector tasks: what each answer is, computed on a padded batch.

Every set holds ``n`` elements with a ``value`` (the digit of an MNIST image or the class of a point,
integers; or, for the ``reals`` task, the element itself, a real number) and, for the position tasks,
an x-coordinate. The answers are vectorised over a padded
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
| median-real | rank | reals | lower median of real numbers drawn from N(0, 1) | real |

``count`` tasks are regressions (their answer grows with ``n``, so a fixed class list could not
extrapolate to the larger test sets); they are scored by the accuracy of the rounded prediction, and
by MAE. ``real`` tasks are regressions on a real-valued answer (MSE on ``answer / scale``), scored by
MSE and MAE; they have no accuracy. x-coordinates and real elements are continuous, so ties between
them have probability 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

NUM_CLASSES = 10       # digits, and point classes
KTH = 3                # the "k-th element from the left" of the kth task (sets hold >= 5 elements)
ELEMENTS = ("mnist", "points", "reals")
OUTPUTS = ("class", "count", "real")


@dataclass(frozen=True)
class Task:
    """``output``: ``"class"`` (cross-entropy over ``num_classes``), ``"count"`` (regression on
    ``answer / scale`` of an integer answer, scored by the rounded prediction; ``scale`` is about the
    answer's spread at the training sizes) or ``"real"`` (regression on ``answer / scale`` of a float
    answer, scored by MSE). ``min_size``: the fewest elements a set needs for its answer to exist (the
    k-th point from the left needs k points); smaller sets would read their answer from the padding."""

    name: str
    family: str
    elements: str                       # "mnist", "points" or "reals"
    output: str
    answer: Callable[[Tensor, Optional[Tensor], Tensor], Tensor]
    num_classes: int = NUM_CLASSES
    scale: float = 1.0
    description: str = ""
    min_size: int = 1

    def __post_init__(self):
        if self.elements not in ELEMENTS:
            raise ValueError(f"elements: expected one of {ELEMENTS}, got {self.elements!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output: expected one of {OUTPUTS}, got {self.output!r}")

    @property
    def metric(self) -> str:
        """What a cell is scored by: accuracy, or for a real task (which has none) the MSE, lower is better."""
        return "mse" if self.output == "real" else "accuracy"

    @property
    def out_features(self) -> int:
        return self.num_classes if self.output == "class" else 1


# ------------------------------------------------------------------------------ answers (B,), values' dtype
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
    Task("second", "rank", "mnist", "class", answer_second, description="second-largest digit", min_size=2),
    Task("leftmost", "position", "points", "class", answer_leftmost, description="class of the leftmost point"),
    Task("kth", "position", "points", "class", answer_kth, description=f"class of the {KTH}rd point from the left",
         min_size=KTH),
    Task("left-of-max", "position", "points", "count", answer_left_of_max, scale=2.0,
         description="points left of the largest-class point"),
    Task("unique", "counting", "mnist", "count", answer_unique, scale=2.0, description="number of distinct digits"),
    # The lower median of N(0, 1) values has a spread below 1 at the training sizes: no rescaling needed.
    Task("median-real", "rank", "reals", "real", answer_median, description="lower median of real numbers"),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]
