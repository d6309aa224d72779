"""Monitoring the permutation modules from outside their forward: the learned step sizes eta
(paper appendix G) and how sharp the permutations are (mean row entropy of the last forward).

A trainer needs two lines::

    monitor = PermutationMonitor(model)          # once, after building (and wrapping) the model
    monitor.log(writer, step)                    # whenever it logs; writer may be None

``monitor.step_sizes()`` is the one way to read every eta of a model (``module.eta`` reads one).

The entropy is recorded by forward hooks, so the modules' forward does no monitoring work and
nothing is recorded once the monitor is removed (``monitor.remove()`` or ``with`` block).
"""
from __future__ import annotations

import functools
import inspect
from typing import Dict, Iterator, List, Tuple

import torch
from torch import Tensor, nn

from .encoder import PermutationOptimization
from .masking import resolve_mask
from .optimize import permutation_entropy

_FORWARD = inspect.signature(PermutationOptimization.forward)


# torch.compile's wrapper (OptimizedModule) holds the compiled module as the submodule "_orig_mod"
_COMPILED = "_orig_mod"


def _unwrap(model: nn.Module) -> nn.Module:
    # DataParallel / DistributedDataParallel keep the real model in .module, torch.compile in
    # ._orig_mod; wrappers may nest (a compiled DDP model)
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, _COMPILED, None), nn.Module):
            model = getattr(model, _COMPILED)
        else:
            return model


def _modules(model: nn.Module) -> Iterator[Tuple[str, PermutationOptimization]]:
    """``(module path, module)`` of every PermutationOptimization (LinAssign included) in ``model``
    (unwrapped); the model itself is named ``"permutation"``. Paths leave out torch.compile's
    wrapper, so that a compiled model (or submodule) logs under the tags of the plain one."""
    for name, m in _unwrap(model).named_modules():
        if isinstance(m, PermutationOptimization):
            name = ".".join(part for part in name.split(".") if part != _COMPILED)
            yield name or "permutation", m


def _write(writer, values: Dict[str, float], step: int) -> None:
    if writer is not None:
        for tag, v in values.items():
            writer.add_scalar(tag, v, step)


class PermutationMonitor:
    """Forward hooks on every :class:`PermutationOptimization` (and :class:`LinAssign`) inside
    ``model`` (DataParallel / DistributedDataParallel and ``torch.compile``'s wrapper unwrapped;
    the modules inside :class:`PermutationSetEncoder` too).

    Each forward of such a module records the mean of :func:`permutation_entropy` of its output
    over the batch's non-empty sets (rows of real elements only; under ``no_grad``, in float32;
    kept as tensors, so recording costs one O(B N^2) reduction and no host synchronisation). An
    empty set has no rows and is left out of the mean (as 0 it would read as a hard permutation);
    a forward without any real element (an empty batch, or only empty sets) records nothing. Under
    ``nn.DataParallel`` the value is that of the last replica to finish.

    ``step_sizes()`` -> ``{"<path>": float}``: the learned step size eta of every module that has
    one (paper appendix G), read now; needs no forward.
    ``values()`` -> ``{"eta/<path>": float, "permutation_entropy/<path>": float}`` (eta read now,
    entropy of the last recorded forward); ``log(writer, step)`` writes them (``writer`` may be
    None) and returns them. ``remove()`` (or leaving a ``with`` block) removes the hooks and
    forgets the recorded values.

    Args:
        model: the ``nn.Module`` holding the permutation modules, searched once, when the monitor
            is built (a model without any gives empty dicts).
        eta_prefix, entropy_prefix: the first part of the tags, ``"eta"`` and
            ``"permutation_entropy"`` by default.
    """

    def __init__(self, model: nn.Module, eta_prefix: str = "eta", entropy_prefix: str = "permutation_entropy"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the model holding the permutation modules), "
                            f"got {type(model).__name__}")
        self.model = model
        self.eta_prefix = eta_prefix
        self.entropy_prefix = entropy_prefix
        self._entropy: Dict[str, Tuple[Tensor, Tensor]] = {}     # path -> (sum over non-empty sets, their count)
        self._handles: List[torch.utils.hooks.RemovableHandle] = [
            m.register_forward_hook(functools.partial(self._record, name), with_kwargs=True)
            for name, m in _modules(model)]

    def _record(self, name: str, module: nn.Module, args, kwargs, output) -> None:
        P = output[-1] if isinstance(output, list) else output
        if P.shape[0] == 0:
            return
        call = _FORWARD.bind(module, *args, **kwargs).arguments
        with torch.no_grad():
            mask = resolve_mask(call["x"], call.get("mask"), call.get("lengths"), call.get("key_padding_mask"))
            ent = permutation_entropy(P.detach().float(), mask)
            # which sets are empty is known on the device only: sum and count are kept, divided when
            # read, and a forward without a real element keeps the earlier pair by a select, not a branch
            nonempty = (mask.any(-1) if mask is not None else torch.full_like(ent, P.shape[1] > 0, dtype=torch.bool))
            total, count = ent.sum(), nonempty.sum()
            if name in self._entropy:
                old_total, old_count = self._entropy[name]
                total, count = torch.where(count > 0, total, old_total), torch.where(count > 0, count, old_count)
            self._entropy[name] = (total, count)

    def entropies(self) -> Dict[str, float]:
        """``{module path: mean permutation entropy of the non-empty sets of its last forward that had
        any}`` (one host sync per value)."""
        out = {}
        for name, (total, count) in self._entropy.items():
            total, n = torch.stack([total, count.to(total.dtype)]).tolist()
            if n:
                out[name] = total / n
        return out

    def step_sizes(self) -> Dict[str, float]:
        """``{module path: eta}`` for every module with a step size (one host sync per value)."""
        return {name: float(m.eta.detach()) for name, m in _modules(self.model) if m.eta is not None}

    def values(self) -> Dict[str, float]:
        out = {f"{self.eta_prefix}/{name}": eta for name, eta in self.step_sizes().items()}
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
        return f"PermutationMonitor(modules={len(self._handles)}, recorded={sorted(self._entropy)})"
