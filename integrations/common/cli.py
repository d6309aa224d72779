"""What the command lines share: checked argument types, the run flags, the device, the data root,
and the entry point that turns known failures into one line and an exit code."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Type

import torch

from setperm.pairwise import KERNELS

from .checkpoint import CheckpointError
from .lifecycle import RunError, RunInterrupted

REPO = Path(__file__).resolve().parents[2]
DATA_ROOT_ENV = "SETPERM_DATA_ROOT"


# ---------------------------------------------------------------- argument types (argparse error, exit 2)
def _int_at_least(text: str, minimum: int) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if n < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {n}")
    return n


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, epochs, intervals)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds, step counts that may be zero)."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, temperatures)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return v


def non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return v


def device_name(text: str) -> str:
    """A device the machine has (``auto``, ``cpu``, ``cuda[:i]``, ``mps``), checked at parse time."""
    try:
        resolve_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--device: ", "")) from None
    return text


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise validate the name.

    Raises ``ValueError`` with the name received for an unknown or unavailable device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device: unknown device {name!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device: {name!r} requested but MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device: unsupported device type {dev.type!r} (use cpu, cuda[:i], mps or auto)")
    return dev


# ---------------------------------------------------------------- shared flags
def add_kernel_argument(parser) -> None:
    """``--kernel``: setperm's pairwise-MLP kernel, the same flag in every training script."""
    parser.add_argument("--kernel", choices=KERNELS, default="auto",
                        help="pairwise-MLP kernel: auto (default: compiled on CUDA, chunked elsewhere), chunked (plain "
                             "PyTorch) or compiled (torch.compile-fused, faster; compiles on first use, needs a C++ "
                             "compiler on CPU / Triton on CUDA). Same results")


def add_run_arguments(parser, *, out_help: str) -> None:
    """``--out``, ``--resume``, ``--overwrite``: the run rule of the README's "Runs" section."""
    parser.add_argument("--out", default=None, help=out_help)
    way = parser.add_mutually_exclusive_group()
    way.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its newest intact checkpoint (settings must match)")
    way.add_argument("--overwrite", action="store_true", help="delete the run in --out and start again")


def default_data_root() -> Path:
    """The data folder when ``--data-root`` is not given: ``$SETPERM_DATA_ROOT``, else ``../shared/data``
    beside the repository checkout."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env) if env else (REPO.parent / "shared" / "data").resolve()


def add_data_root_argument(parser, *, what: str = "data sets") -> None:
    parser.add_argument("--data-root", default=None,
                        help=f"folder with the {what} (default: ${DATA_ROOT_ENV}, else ../shared/data beside the "
                             "repository)")


def data_root(flag: Optional[str]) -> Path:
    """The data root in the documented order: the flag, ``$SETPERM_DATA_ROOT``, ``../shared/data``."""
    return Path(flag) if flag else default_data_root()


def set_threads(n: Optional[int]) -> None:
    if n is not None:
        torch.set_num_threads(n)


# ---------------------------------------------------------------- entry point
def run_command(main: Callable[[Optional[Sequence[str]]], Optional[int]], prog: str,
                argv: Optional[Sequence[str]] = None,
                errors: Tuple[Type[BaseException], ...] = ()) -> int:
    """Run a CLI's ``main`` and return the process exit code.

    A refused run, unreadable checkpoint, missing file or any of ``errors`` (the integration's data
    errors) prints ``<prog>: error: <message>`` and gives 1; an interrupt that wrote a checkpoint
    prints where it is and gives 128 + signal number; Ctrl-C outside a training loop gives 130.
    """
    try:
        return int(main(argv) or 0)
    except RunInterrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except (RunError, CheckpointError, FileNotFoundError, *errors) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted (nothing to checkpoint at this point)", file=sys.stderr)
        return 130
