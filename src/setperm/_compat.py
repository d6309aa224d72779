"""What differs between the torch releases the package supports (2.0 and newer): each name here
takes the newer API where this torch has it and the older one's equivalent elsewhere.

Importing this module imports no more of torch: ``torch._dynamo`` and ``torch._inductor`` are
imported only when a function here needs them (once ``torch.compile`` has run). ``is_compiling`` is
chosen when this module is imported (an attribute check): inside a traced function dynamo must meet
torch's own function, or code it can trace on every release.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from typing import Tuple, Type

import torch


if hasattr(torch, "compiler") and hasattr(torch.compiler, "is_compiling"):     # torch >= 2.3
    is_compiling = torch.compiler.is_compiling
else:
    def is_compiling() -> bool:
        """Whether ``torch.compile`` is tracing the current call (then every data-dependent choice
        must stay in the graph)."""
        # torch 2.0 - 2.2: dynamo's own flag; until torch.compile has imported dynamo nothing traces.
        # A membership test, because dynamo 2.1 / 2.2 cannot trace ``hasattr`` on a module or a
        # comparison of one with None.
        if "torch._dynamo" in sys.modules:
            return torch._dynamo.is_compiling()
        return False


def signature_kept(fn):
    """``fn`` with its signature stored on it (``__signature__``, which :func:`inspect.signature`
    returns as it is). ``autograd.Function.apply`` (torch 2.13, for one) binds the arguments to
    ``forward``'s signature at every call of a Function with ``setup_context``, and working the
    signature out again costs more than the binding (about 10-20 us per call, several calls per
    forward: felt with small sets)."""
    fn.__signature__ = inspect.signature(fn)
    return fn


def default_device() -> torch.device:
    """Where a factory function without ``device=`` creates tensors (``torch.set_default_device``
    or a ``with torch.device(...)`` block; ``torch.get_default_device`` of torch 2.3 misses the
    latter)."""
    return torch.empty(()).device


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` (never for a device type autocast does
    not know, such as ``"meta"``)."""
    try:
        return torch.is_autocast_enabled(device_type)                   # torch >= 2.4
    except TypeError:                                                   # older: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()
    except RuntimeError:                                                # a device type autocast does not know
        return False


def autocast_off(device_type: str):
    """A context in which ``torch.autocast`` is off for ``device_type``.

    ``torch.autocast(device_type, enabled=False)`` where autocast is on; where it is off there is
    nothing to undo and no context is entered: ``torch.autocast`` raises for a device type it does
    not know (``"meta"`` on every release, Apple's ``"mps"`` before torch 2.5), and entering it costs
    a few microseconds on every call. Under ``torch.compile`` always the autocast context, which
    dynamo traces on every release."""
    if is_compiling() or autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class _NeverRaised(Exception):
    """Stands for an exception class this torch does not have (an ``except`` clause that then
    matches nothing)."""


def hit_recompile_limit(err: BaseException) -> bool:
    """Whether ``err`` is what a ``torch.compile(fullgraph=True)`` function raises when dynamo's
    recompile limit is reached: ``FailOnRecompileLimitHit`` (newer torch), ``RecompileLimitExceeded``
    (torch 2.6 raises it though it has the former), or an ``Unsupported`` saying so (2.1 - 2.5)."""
    dynamo = importlib.import_module("torch._dynamo.exc")
    named = tuple(getattr(dynamo, name, _NeverRaised)
                  for name in ("FailOnRecompileLimitHit", "RecompileLimitExceeded"))
    if isinstance(err, named):
        return True
    return isinstance(err, dynamo.Unsupported) and any(
        f"{limit} reached" in str(err) for limit in ("cache_size_limit", "recompile_limit"))


def compiler_errors() -> Tuple[Type[BaseException], ...]:
    """The errors of a backend that fails to build a compiled function: dynamo's wrapper, and
    inductor's own error where this torch raises one (newer releases raise it directly)."""
    dynamo, inductor = (importlib.import_module(f"torch.{name}.exc") for name in ("_dynamo", "_inductor"))
    return (dynamo.BackendCompilerFailed, getattr(inductor, "InductorError", _NeverRaised))
