"""TensorBoard monitoring of the learned step sizes eta (paper appendix G) and of how sharp the
permutations are (mean row entropy of the last forward)."""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .encoder import PermutationOptimizer


def _unwrap(model: nn.Module) -> nn.Module:
    # DataParallel / DistributedDataParallel keep the real model in .module
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def find_step_sizes(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{module name: eta}`` for every :class:`PermutationOptimizer` inside ``model``."""
    return {name or "permutation": m.eta.detach() for name, m in _unwrap(model).named_modules()
            if isinstance(m, PermutationOptimizer) and m.eta is not None}


def set_entropy_tracking(model: nn.Module, enabled: bool = True) -> None:
    """Make every PermutationOptimizer keep the mean permutation entropy of its last forward
    (one extra O(B N^2) reduction per call)."""
    for m in _unwrap(model).modules():
        if isinstance(m, PermutationOptimizer):
            m.track_entropy = enabled
            if not enabled:
                m.last_entropy = None


def log_step_sizes(writer, model: nn.Module, step: int, prefix: str = "eta",
                   entropy_prefix: Optional[str] = "permutation_entropy") -> Dict[str, float]:
    """Write every learned eta (and, where tracked, the last permutation entropy) to a
    ``torch.utils.tensorboard.SummaryWriter`` as scalars ``{prefix}/{module name}``.

    ``writer`` may be None (e.g. on non-zero ranks): nothing is written. Returns the values.
    """
    values: Dict[str, float] = {}
    for name, m in _unwrap(model).named_modules():
        if not isinstance(m, PermutationOptimizer):
            continue
        name = name or "permutation"
        if m.eta is not None:
            values[f"{prefix}/{name}"] = float(m.eta.detach())
        if entropy_prefix and m.last_entropy is not None:
            values[f"{entropy_prefix}/{name}"] = float(m.last_entropy)
    if writer is not None:
        for tag, v in values.items():
            writer.add_scalar(tag, v, step)
    return values
