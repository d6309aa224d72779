"""Random sets of numbers (paper section 4.1): fresh draws every batch, reproducible per step."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from integrations.common.seeding import seeded_generator, step_seed  # noqa: F401  (step_seed: the sorting API)

# Paper F.1 (the same as Mena et al. 2018): training on [0, 1], evaluation on all seven.
PAPER_INTERVALS: Tuple[Tuple[float, float], ...] = (
    (0.0, 1.0), (0.0, 10.0), (0.0, 1000.0), (1.0, 2.0), (10.0, 11.0), (100.0, 101.0), (1000.0, 1001.0),
)


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
    if seed is not None:
        gen = seeded_generator(seed)
    else:
        gen = torch.Generator(device="cpu")
        gen.seed()
    u = torch.rand(batch_size, set_size, 1, generator=gen, dtype=dtype)
    return (u * (high - low) + low).to(device)
