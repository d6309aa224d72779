"""Sets for the tasks: fresh training batches from a seeded generator, fixed validation and test sets.

* MNIST elements are images, represented by their frozen CNN features (:mod:`.embedding`). Training
  sets draw from the 60,000 training images, validation sets from the even-numbered test images and
  test sets from the odd-numbered ones, so no image is shared between training, validation and test.
  (Not the first and second half: MNIST's test file holds two writer populations one after the
  other, and the halves differ in difficulty.)
* Point elements are ``[x, y, one-hot(class)]`` with x, y uniform in [0, 1] and the class uniform in
  0..9. Elements come in random order (they are drawn i.i.d.), which is the order the LSTM and GRU
  baselines read.
* Real elements are one number each, drawn from N(0, 1), fed as a 1-feature element; the value is
  the element itself.

The validation and test sets are derived from ``data_seed`` alone (not the model seed), so every
encoder and every seed of a run is scored on the same sets; :func:`fingerprint` lets the report
check that.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn import functional as F

from integrations.common.seeding import generator as keyed_generator

from .tasks import NUM_CLASSES, Task

POINT_FEATURES = 2 + NUM_CLASSES
REAL_FEATURES = 1


@dataclass
class ElementPool:
    """Images a set draws from: ``features (M, F)`` float32, ``labels (M,)`` long (digits)."""

    features: Tensor
    labels: Tensor

    def __post_init__(self):
        if self.features.dim() != 2 or self.labels.shape != (self.features.shape[0],):
            raise ValueError(f"pool: expected features (M, F) and labels (M,), got {tuple(self.features.shape)} "
                             f"and {tuple(self.labels.shape)}")


@dataclass
class SetBatch:
    """A padded batch of sets and their answers.

    ``elements (B, N, F)`` float32 (padding zero), ``mask (B, N)`` bool (True = real element),
    ``values (B, N)`` long (digit / class of each element; float32 for real elements), ``xs (B, N)``
    float or None (x-coordinates of the points), ``target (B,)`` the task's answer (long; float32 for
    a ``real`` task)."""

    elements: Tensor
    mask: Tensor
    values: Tensor
    xs: Optional[Tensor]
    target: Tensor

    def __len__(self) -> int:
        return self.elements.shape[0]

    def slice(self, start: int, stop: int) -> "SetBatch":
        """Sets ``start:stop``, trimmed to their own largest size."""
        n = int(self.mask[start:stop].sum(1).max()) if stop > start else 0
        xs = None if self.xs is None else self.xs[start:stop, :n]
        return SetBatch(self.elements[start:stop, :n], self.mask[start:stop, :n], self.values[start:stop, :n],
                        xs, self.target[start:stop])


def element_features(task: Task, pool: Optional[ElementPool]) -> int:
    """Width F of the raw elements of ``task``."""
    if task.elements == "mnist":
        return pool.features.shape[1]
    return POINT_FEATURES if task.elements == "points" else REAL_FEATURES


def sample_sets(task: Task, sizes: Tensor, generator: torch.Generator, pool: Optional[ElementPool] = None) -> SetBatch:
    """One set per entry of ``sizes (B,)`` (each >= 1), elements i.i.d.; ``pool`` for MNIST tasks.

    Each kind of element draws from ``generator`` in its own fixed order, so the sets of one kind
    do not depend on which other kinds exist."""
    if sizes.dim() != 1 or len(sizes) == 0 or int(sizes.min()) < 1:
        raise ValueError(f"sizes: expected a non-empty (B,) tensor of sizes >= 1, got {sizes.tolist()}")
    if int(sizes.min()) < task.min_size:
        raise ValueError(f"sizes: task {task.name!r} needs sets of at least {task.min_size} elements, "
                         f"got {int(sizes.min())}")
    B, N = len(sizes), int(sizes.max())
    mask = torch.arange(N) < sizes.unsqueeze(1)
    xs = None
    if task.elements == "mnist":
        if pool is None:
            raise ValueError(f"task {task.name!r} draws MNIST images: pass pool")
        idx = torch.randint(len(pool.labels), (B, N), generator=generator)
        values, elements = pool.labels[idx], pool.features[idx]
    elif task.elements == "reals":
        values = torch.randn(B, N, generator=generator)
        elements = values.unsqueeze(-1)
    else:
        values = torch.randint(NUM_CLASSES, (B, N), generator=generator)
        xy = torch.rand(B, N, 2, generator=generator)
        xs = xy[..., 0]
        elements = torch.cat([xy, F.one_hot(values, NUM_CLASSES).float()], dim=-1)
    elements = torch.where(mask.unsqueeze(-1), elements, torch.zeros((), dtype=elements.dtype))
    values = torch.where(mask, values, torch.zeros((), dtype=values.dtype))
    if xs is not None:
        xs = torch.where(mask, xs, torch.zeros((), dtype=xs.dtype))
    return SetBatch(elements, mask, values, xs, task.answer(values, xs, mask))


def random_sizes(count: int, size: Union[int, Tuple[int, int]], generator: torch.Generator) -> Tensor:
    """``count`` set sizes: all equal to ``size``, or uniform in the inclusive range ``(lo, hi)``."""
    if isinstance(size, int):
        return torch.full((count,), size, dtype=torch.long)
    lo, hi = size
    return torch.randint(lo, hi + 1, (count,), generator=generator)


def fixed_sets(task: Task, split: str, count: int, size: Union[int, Tuple[int, int]], data_seed: int,
               pool: Optional[ElementPool] = None) -> SetBatch:
    """The validation (``split="val"``) or test (``"test"``) sets of ``task`` at ``size``: a function of
    ``(task, split, size, data_seed)`` only. ``pool``: the MNIST test images of an MNIST task
    (validation sets use the even-numbered ones, test sets the odd-numbered ones)."""
    if split not in ("val", "test"):
        raise ValueError(f"split: expected 'val' or 'test', got {split!r}")
    g = keyed_generator(data_seed, task.name, split, size)
    if pool is not None:
        half = slice(0, None, 2) if split == "val" else slice(1, None, 2)
        pool = ElementPool(pool.features[half], pool.labels[half])
    return sample_sets(task, random_sizes(count, size, g), g, pool)


def fingerprint(batch: SetBatch) -> str:
    """A short hash of the sets' values, positions and answers (equal sets -> equal fingerprints)."""
    h = hashlib.sha256()
    for t in (batch.values, batch.mask, batch.target) + (() if batch.xs is None else (batch.xs,)):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
