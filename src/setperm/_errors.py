"""How setperm tells its user what is wrong: argument checks at the public boundary (a
``ValueError`` that names the argument and what it received) and warnings that point at the
user's line, not at setperm's or torch's."""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import List

import torch

from ._compat import is_compiling


def check_int(value, name: str, minimum: int = 0) -> int:
    """``value`` as an int if it is an integer >= ``minimum`` (a bool is not: ``True`` is no size
    or count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        wanted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return int(value)


def check_positive(value, name: str, *, finite: bool = False) -> float:
    """``value`` if it is a real number > 0 (NaN, a bool and a tensor are refused: a tensor's value
    would have to be read from its device); with ``finite``, infinity is refused too."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 \
            or (finite and not math.isfinite(value)):
        raise ValueError(f"{name} must be a {'finite ' if finite else ''}number > 0, got {value!r}")
    return float(value)


def check_same_device(t, name: str, ref, ref_name: str) -> None:
    """``t`` on ``ref``'s device (checked by device, before any arithmetic mixes them)."""
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: give both on one device")


_OWN = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` of :func:`warnings.warn`, called by the caller of this function, that
    names the innermost line outside setperm and torch (the user's call, or their ``backward()``);
    the outermost frame where every frame is theirs (a backward run by an autograd worker thread).
    2 (the caller's caller) inside a ``torch.compile`` trace, which does not follow frames."""
    if is_compiling():
        return 2
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_OWN):
        frame, level = frame.f_back, level + 1
    return level


def warn_once(seen: set, reason: str, message: str) -> None:
    """A RuntimeWarning ``message`` at the user's line the first time ``reason`` is added to ``seen``
    (a fallback that would otherwise warn at every call)."""
    if reason not in seen:
        seen.add(reason)
        warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())


def registered_hooks(module: torch.nn.Module) -> List[str]:
    """The kinds of hooks registered on ``module`` itself, as a warning names them: for a module
    whose weights setperm reads without calling it, so that its hooks do not run."""
    return [kind for kind, attr in (("forward pre-hooks", "_forward_pre_hooks"), ("forward hooks", "_forward_hooks"),
                                    ("backward hooks", "_backward_hooks"),
                                    ("backward pre-hooks", "_backward_pre_hooks"))
            if getattr(module, attr, None)]
