"""Monitoring the permutation optimisers from outside their forward: the learned step sizes eta
(paper appendix G) and how sharp the permutations are (mean row entropy of the last forward).

A trainer needs two lines::

    monitor = PermutationMonitor(model)          # once, after building (and wrapping) the model
    monitor.log(writer, step)                    # whenever it logs; writer may be None

The entropy is recorded by forward hooks, so the modules' forward does no monitoring work and
nothing is recorded once the monitor is removed (``monitor.remove()`` or ``with`` block).
"""
from __future__ import annotations

import functools
import inspect
from typing import Dict, Iterator, List, Tuple

import torch
from torch import Tensor, nn

from .encoder import PermutationOptimizer
from .masking import resolve_mask
from .optimize import permutation_entropy

_FORWARD = inspect.signature(PermutationOptimizer.forward)


def _unwrap(model: nn.Module) -> nn.Module:
    # DataParallel / DistributedDataParallel keep the real model in .module
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def _optimizers(model: nn.Module) -> Iterator[Tuple[str, PermutationOptimizer]]:
    """``(module path, module)`` of every PermutationOptimizer in ``model`` (unwrapped); the model
    itself is named ``"permutation"``."""
    for name, m in _unwrap(model).named_modules():
        if isinstance(m, PermutationOptimizer):
            yield name or "permutation", m


def find_step_sizes(model: nn.Module) -> Dict[str, Tensor]:
    """``{module path: eta}`` (detached 0-d tensors) for every :class:`PermutationOptimizer` with a
    step size inside ``model`` (DataParallel / DistributedDataParallel are unwrapped)."""
    return {name: m.eta.detach() for name, m in _optimizers(model) if m.eta is not None}


def log_step_sizes(writer, model: nn.Module, step: int, prefix: str = "eta") -> Dict[str, float]:
    """Write every learned eta to a ``torch.utils.tensorboard.SummaryWriter`` as the scalars
    ``{prefix}/{module path}``. ``writer`` may be None (e.g. on non-zero ranks): nothing is
    written. Returns ``{tag: value}``."""
    values = {f"{prefix}/{name}": float(eta) for name, eta in find_step_sizes(model).items()}
    _write(writer, values, step)
    return values


def _write(writer, values: Dict[str, float], step: int) -> None:
    if writer is not None:
        for tag, v in values.items():
            writer.add_scalar(tag, v, step)


class PermutationMonitor:
    """Forward hooks on every :class:`PermutationOptimizer` inside ``model`` (DataParallel /
    DistributedDataParallel unwrapped; the optimisers inside :class:`PermutationSetEncoder` too).

    Each forward of an optimiser records the mean over the batch of :func:`permutation_entropy`
    of its output (rows of real elements only; under ``no_grad``, in float32; kept as a tensor,
    so recording costs one O(B N^2) reduction and no host synchronisation). Empty batches record
    nothing. Under ``nn.DataParallel`` the value is that of the last replica to finish.

    ``values()`` -> ``{"eta/<path>": float, "permutation_entropy/<path>": float}`` (eta read now,
    entropy of the last recorded forward); ``log(writer, step)`` writes them (``writer`` may be
    None) and returns them. ``remove()`` (or leaving a ``with`` block) removes the hooks and
    forgets the recorded values.
    """

    def __init__(self, model: nn.Module, eta_prefix: str = "eta", entropy_prefix: str = "permutation_entropy"):
        self.model = model
        self.eta_prefix = eta_prefix
        self.entropy_prefix = entropy_prefix
        self._entropy: Dict[str, Tensor] = {}
        self._handles: List[torch.utils.hooks.RemovableHandle] = [
            m.register_forward_hook(functools.partial(self._record, name), with_kwargs=True)
            for name, m in _optimizers(model)]

    def _record(self, name: str, module: nn.Module, args, kwargs, output) -> None:
        P = output[-1] if isinstance(output, list) else output
        if P.shape[0] == 0:
            return
        call = _FORWARD.bind(module, *args, **kwargs).arguments
        with torch.no_grad():
            mask = resolve_mask(call["x"], call.get("mask"), call.get("lengths"), call.get("key_padding_mask"))
            self._entropy[name] = permutation_entropy(P.detach().float(), mask).mean()

    def entropies(self) -> Dict[str, float]:
        """``{module path: mean permutation entropy of its last forward}`` (one host sync per value)."""
        return {name: float(v) for name, v in self._entropy.items()}

    def values(self) -> Dict[str, float]:
        out = {f"{self.eta_prefix}/{name}": float(eta) for name, eta in find_step_sizes(self.model).items()}
        out.update({f"{self.entropy_prefix}/{name}": v for name, v in self.entropies().items()})
        return out

    def log(self, writer, step: int) -> Dict[str, float]:
        values = self.values()
        _write(writer, values, step)
        return values

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._entropy = {}

    def __enter__(self) -> "PermutationMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"PermutationMonitor(optimizers={len(self._handles)}, recorded={sorted(self._entropy)})"
