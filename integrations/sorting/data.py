"""Random sets of numbers (paper section 4.1): fresh draws every batch, reproducible per step."""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

# Paper F.1 (the same as Mena et al. 2018): training on [0, 1], evaluation on all seven.
PAPER_INTERVALS: Tuple[Tuple[float, float], ...] = (
    (0.0, 1.0), (0.0, 10.0), (0.0, 1000.0), (1.0, 2.0), (10.0, 11.0), (100.0, 101.0), (1000.0, 1001.0),
)


def step_seed(*keys: int) -> int:
    """A 63-bit seed derived from integer keys (e.g. ``(seed, step)``).

    Drawing batch ``t`` from ``step_seed(seed, t)`` makes the data stream independent of where a run
    was interrupted, so a resumed run sees exactly the batches an uninterrupted run would.
    """
    if any(int(k) < 0 for k in keys):
        raise ValueError(f"keys must be non-negative integers, got {keys}")
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_sets(batch_size: int, set_size: int, low: float = 0.0, high: float = 1.0, *,
                dtype: torch.dtype = torch.float32, seed: Optional[int] = None,
                device: torch.device | str = "cpu") -> Tensor:
    """``batch_size`` sets of ``set_size`` numbers from U[low, high) -> ``(B, N, 1)``.

    Like the released code (``torch.rand * (high - low) + low``), the uniform draw is made directly
    in ``dtype``: in float64 the sets on [1000, 1001] are distinct with overwhelming probability,
    which float32 cannot guarantee for large N (paper F.1, the birthday problem).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if set_size < 1:
        raise ValueError(f"set_size must be >= 1, got {set_size}")
    if not low < high:
        raise ValueError(f"interval must satisfy low < high, got [{low}, {high}]")
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    u = torch.rand(batch_size, set_size, 1, generator=gen, dtype=dtype)
    return (u * (high - low) + low).to(device)
