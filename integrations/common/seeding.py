"""One seeding module for every trainer: random streams keyed by (seed, step, ...).

Batch ``t`` of a run is drawn from a generator seeded by ``step_seed(seed, t)`` (or
``(seed, epoch, batch)``), never from a stream that advances with the run. The data a run sees
therefore does not depend on where it was interrupted, and ``--resume`` reproduces the
uninterrupted run exactly.

Keys may be names as well as integers (a task, a split): such keys are hashed with crc32, which,
unlike Python's ``hash()`` of a str, is the same in every process. Streams that are seeded with the
seed itself use :func:`seeded_generator`. The committed results were drawn with exactly these seeds.
"""
from __future__ import annotations

import random
import zlib
from typing import Union

import numpy as np
import torch


def step_seed(*keys: Union[int, str]) -> int:
    """A seed from keys, e.g. ``(seed, step)``, ``(seed, epoch, batch)`` or ``(seed, "kth", "test", 8)``.

    Non-negative integer keys give 63 bits: numpy's ``SeedSequence`` hashes the keys as a sequence of
    32-bit words, so neighbouring keys of one length give unrelated streams (unlike ``seed + step``).
    Keys of *different* lengths are not always told apart: up to four words, trailing zero keys add
    nothing (``(s, e)``, ``(s, e, 0)`` and ``(s, e, 0, 0)`` give one seed), and a key of 2**32 or more
    counts as several words (``(2**32,)`` is ``(0, 1)``). Streams with different purposes therefore use
    keys of one length each, or a name. (The scheme stays as it is: it drew the committed results.)
    Keys that include a name (a ``str``) give the 32-bit crc32 of all keys written out and joined by ``"/"``.
    """
    if not keys:
        raise ValueError("keys must be one or more non-negative integers or names, got none")
    if any(isinstance(k, str) for k in keys):
        return zlib.crc32("/".join(str(k) for k in keys).encode())
    ints = tuple(int(k) for k in keys)
    if any(k < 0 for k in ints):
        raise ValueError(f"keys must be one or more non-negative integers or names, got {ints}")
    # (shifted as a Python int: NumPy 1.x refuses uint64 >> int)
    return int(np.random.SeedSequence(list(ints)).generate_state(1, dtype=np.uint64)[0]) >> 1


def generator(*keys: Union[int, str]) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`step_seed` of ``keys``."""
    return seeded_generator(step_seed(*keys))


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` itself (a stream that is not keyed by a step)."""
    return torch.Generator().manual_seed(int(seed))


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (model initialisation, dropout)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
