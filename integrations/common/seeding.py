"""One seeding scheme for every trainer: random streams keyed by (seed, step, ...).

Batch ``t`` of a run is drawn from a generator seeded by ``step_seed(seed, t)`` (or
``(seed, epoch, batch)``), never from a stream that advances with the run. The data a run sees
therefore does not depend on where it was interrupted, and ``--resume`` reproduces the
uninterrupted run exactly.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def step_seed(*keys: int) -> int:
    """A 63-bit seed from non-negative integer keys, e.g. ``(seed, step)`` or ``(seed, epoch, batch)``.

    numpy's ``SeedSequence`` hashes the whole key tuple, so neighbouring keys give unrelated
    streams (unlike ``seed + step``) and no key combination collides with another by arithmetic.
    """
    keys = tuple(int(k) for k in keys)
    if not keys or any(k < 0 for k in keys):
        raise ValueError(f"keys must be one or more non-negative integers, got {keys}")
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def generator(*keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`step_seed` of ``keys``."""
    g = torch.Generator()
    g.manual_seed(step_seed(*keys))
    return g


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (model initialisation, dropout)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
