"""What the command lines share: checked argument types, the run flags, the device, the data root,
and the entry point that turns known failures into one line and an exit code."""
from __future__ import annotations

import argparse
import codecs
import io
import math
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Type

import torch

from setperm.pairwise import KERNELS, KernelBuildError

from .atomic import os_error_in
from .checkpoint import CheckpointError
from .distributed import launched_rank
from .lifecycle import NonFiniteError, RunError, RunInterrupted, stop_now_in

REPO = Path(__file__).resolve().parents[2]
DATA_ROOT_ENV = "SETPERM_DATA_ROOT"
# torch's intra-op threads of every command and benchmark. One: the set layer's operations are
# small, so a second thread gains little on a quiet machine, and where another process holds a
# core, OpenMP threads that wait for it make every operation many times slower (the README's
# "Threads" section has the measurements and the command).
DEFAULT_THREADS = 1


class CommandError(ValueError):
    """A flag or input that cannot work, found after parsing (a checkpoint of another kind, sizes
    that contradict each other); :func:`run_command` prints its message as one line."""


def checkpoint_config(state: dict, kind: str, keys, *, choice: Optional[tuple] = None, run="", flag: str = "--run") -> dict:
    """The stored config of a checkpoint ``state`` that must come from a ``kind`` run (``"sorting"``,
    ``"mosaic"``, ``"BAN"``): it holds every setting of ``keys``, and ``choice`` = ``(key, allowed values)`` is one of
    them. Else a CommandError naming ``flag``, ``run`` and the file: a checkpoint of another integration
    would otherwise fail later, on a setting it never had, with a traceback."""
    cfg = state["config"]
    missing = [k for k in keys if k not in cfg]
    what = f"its config lacks {', '.join(missing)}" if missing else None
    if what is None and choice is not None and cfg[choice[0]] not in choice[1]:
        what = f"{choice[0]} {cfg[choice[0]]!r}, expected one of {tuple(choice[1])}"
    if what is not None:
        raise CommandError(f"{flag} {run}: {state['path']} is not a checkpoint of a {kind} run ({what})")
    return cfg


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


def refuse_po_u_without_steps(parser: argparse.ArgumentParser, flag: str) -> None:
    """``parser.error`` (exit 2, as argparse words a bad flag, before any folder is touched) for
    PO-U with ``flag`` = 0 inner steps, which every command that trains PO-U refuses."""
    parser.error(f"argument {flag}: PO-U needs T >= 1 inner steps: with T = 0 its P is the uniform assignment "
                 "whatever its weights, so no parameter reaches the loss (LinAssign, --permutation linassign, "
                 "has no inner steps)")


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
        raise CommandError(f"--device: unknown device {name!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device: {name!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise CommandError(f"--device: {name!r} requested but this machine has {count} CUDA device"
                           f"{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1})")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise CommandError(f"--device: {name!r} requested but MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise CommandError(f"--device: unsupported device type {dev.type!r} (use cpu, cuda[:i], mps or auto)")
    return dev


# ---------------------------------------------------------------- shared flags
def add_kernel_argument(parser) -> None:
    """``--kernel``: setperm's kernel, the same flag in every training script."""
    parser.add_argument("--kernel", choices=KERNELS, default="auto",
                        help="setperm's kernel: auto (default: fused on CUDA, chunked elsewhere), chunked (plain "
                             "PyTorch), compiled (pairwise MLP fused by torch.compile, faster; compiles on first use, "
                             "needs a C++ compiler on CPU / Triton on CUDA) or fused (compiled, and on CUDA the "
                             "permutation optimisation as Triton kernels for sets of up to 128 elements). Same results")


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


def add_threads_argument(parser) -> None:
    """``--threads``: torch's CPU threads, the same flag and default in every command."""
    parser.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS,
                        help=f"torch CPU threads (default {DEFAULT_THREADS}; more pay off only on cores that "
                             "nothing else uses: see the README's \"Threads\")")


def set_threads(n: Optional[int]) -> None:
    if n is not None:
        torch.set_num_threads(n)


# ---------------------------------------------------------------- entry point
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every command's ``--help``: descriptions as written, and each option's default appended once,
    as ``(default: X)``, unless its help states it already or there is none to show (a switch, or a
    default of None that the help explains). Lists are shown as they are typed: space-separated
    for several values, comma-separated where one value holds a list."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or action.nargs == 0 or default is None
                or default is argparse.SUPPRESS or default is False):
            return text
        if isinstance(default, (list, tuple)):
            default = (" " if action.nargs in ("*", "+") else ",").join(map(str, default))
        shown = str(default).replace("%", "%%")          # (argparse %-formats the help string)
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def with_help_formatter(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` and every subcommand's parser under it format ``--help`` with :class:`HelpFormatter`
    (a subcommand's parser does not inherit its parent's); returns ``parser``."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                with_help_formatter(sub)
    return parser


def run_command(main: Callable[[Optional[Sequence[str]]], Optional[int]], prog: str,
                argv: Optional[Sequence[str]] = None,
                errors: Tuple[Type[BaseException], ...] = ()) -> int:
    """Run a CLI's ``main`` and return the process exit code.

    A refused run, unreadable checkpoint, missing file, non-finite loss or data, a ``--kernel compiled``
    that cannot be built on this machine, or any of ``errors`` (the integration's data errors) prints
    ``<prog>: error: <message>`` and gives 1; so does a failure
    the OS reported (full disk, read-only or forbidden folder, symlink loop), also when it comes wrapped
    in another exception (``torch.save``'s ``RuntimeError``): ``<prog>: error: <reason>: <path>``. An
    interrupt that wrote a checkpoint prints where it is and gives 128 + signal number; a second signal
    (stop at once) gives 128 + that signal's number; Ctrl-C outside a training loop gives 130. Anything
    else is a defect and keeps its traceback.
    """
    _printable_everywhere()
    try:
        return int(main(argv) or 0)
    except RunInterrupted as e:
        if launched_rank() == 0:                 # (the other ranks stopped at the same step and wrote nothing)
            print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except (RunError, CheckpointError, CommandError, NonFiniteError, FileNotFoundError, KernelBuildError, *errors) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except BaseException as e:  # noqa: BLE001 - sorted below; the rest is re-raised
        stop = stop_now_in(e)
        if stop is not None:
            print(f"\n{prog}: {stop}", file=sys.stderr)
            return stop.exit_code
        if isinstance(e, KeyboardInterrupt):
            print(f"\n{prog}: interrupted (nothing to checkpoint at this point)", file=sys.stderr)
            return 130
        err = os_error_in(e) if isinstance(e, Exception) else None
        if err is None:
            raise
        print(f"{prog}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1


def _printable_everywhere() -> None:
    """Where the output's encoding is not UTF-8 (an ISO-8859 or C locale, a Windows code page, output
    redirected to a file there), a character of a report it cannot encode (the tables' minus and
    dashes) is printed as a backslash escape instead of ending a finished run with a
    UnicodeEncodeError. The files the commands write are UTF-8 wherever they run."""
    for stream in (sys.stdout, sys.stderr):
        if (isinstance(stream, io.TextIOWrapper) and codecs.lookup(stream.encoding).name != "utf-8"
                and stream.errors in ("strict", "surrogateescape")):
            stream.reconfigure(errors="backslashreplace")


def describe_os_error(err: OSError) -> str:
    """``<reason>: <path>`` (``-> <second path>`` for a rename) in one line."""
    reason = err.strerror or str(err) or type(err).__name__
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    return f"{reason}: {' -> '.join(paths)}" if paths else reason
