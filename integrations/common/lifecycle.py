"""One run lifecycle for every trainer: start, refuse, resume, overwrite, finish, interrupt.

The rule (also in the top-level README, section "Runs"):

* ``--out`` is a new or empty folder: a run starts there (``config.json`` is written first).
* ``--out`` holds a run (its ``config.json``):
  - with the same settings and a finished record (``summary.json``), the command prints the
    summary and changes nothing on disk;
  - ``--resume`` continues it from its newest intact checkpoint, exactly as if it had not stopped,
    and refuses any changed setting that would change the results (each named with its old and new
    value); settings that only say how long to train (e.g. ``--epochs``) may grow;
  - ``--overwrite`` deletes it and starts again;
  - otherwise the command is refused with one line naming the folder and these three ways out.
* ``--out`` holds something else (files but no ``config.json``; the lock file ``.lock`` does not count):
  refused, even with ``--overwrite``.
* A run folder belongs to one live process: :func:`open_run` takes an exclusive lock on ``<out>/.lock``
  before it reads, writes or deletes anything there, and holds it while the :class:`Run` lives (the OS
  releases it when the process ends, however it ends). A second command on a folder in use is refused
  at once with one line naming the folder and the pid holding it. A sweep locks its own folder; each of
  its runs locks its own folder, so workers never wait on the sweep's lock.
* Every file is written atomically under a temporary name unique to its writer (:mod:`.atomic`).
* A non-finite loss stops the run before that update (:func:`finite_loss`): one line naming the step;
  the earlier checkpoints stay intact and resumable.
* Checkpoints are written atomically; only this run's checkpoints are rotated, by the step stored
  inside them. An unreadable newest checkpoint is reported (file and reason), moved aside to
  ``<name>.corrupt`` and the previous intact one is used; if none is intact the run is refused.
* SIGINT / SIGTERM: the current step finishes, a checkpoint is written, one line says where it is
  and how to continue, and the process exits with 130 / 143 (128 + signal number), no traceback.
  A second signal stops at once (:class:`StopNow`): a checkpoint being written is abandoned and its
  temporary file removed, the earlier checkpoints stay intact, one line says so and the exit code is
  128 + the number of that second signal.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import uuid
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist

from .atomic import atomic_write, in_chain, remove_abandoned
from .checkpoint import CHECKPOINTS, CheckpointError, read_checkpoint, restore, rng_state, step_files, write_checkpoint

try:
    import fcntl
except ImportError:             # not POSIX: folders are not locked there
    fcntl = None

CONFIG = "config.json"
SUMMARY = "summary.json"
LOCK = ".lock"

# Settings that never change what a run computes: where it runs and how it reports. They may differ
# on --resume (a run may move to another machine or thread count) and are not compared. Like
# data_root, ban_root only says where something lies (the official BAN checkout); the fingerprint of
# the code it holds, ban_code, is not compared here either but by the BAN trainer's own check on
# --resume (so that runs recorded before the fingerprint existed still count as finished).
OPERATIONAL = frozenset({"out", "resume", "overwrite", "device", "threads", "workers", "log_every",
                         "checkpoint_every", "max_steps", "stop_at", "run_id", "command", "commands", "data_root",
                         "ban_root", "ban_code", "progress", "kernel"})


class RunError(RuntimeError):
    """A run cannot start as asked. The message is one line for the user; CLIs print it and exit 1."""


class RunInterrupted(Exception):
    """Raised after a checkpoint was written because SIGINT / SIGTERM arrived; CLIs print it and exit
    with :attr:`exit_code` (128 + signal number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path], out: Path, where: Optional[str] = None):
        """``where``: what was kept, for a sweep whose unit is a run or a cell (default: the step and the
        checkpoint of a single run)."""
        self.signum, self.step, self.checkpoint, self.out = signum, step, checkpoint, out
        name = signal.Signals(signum).name
        if where is None:
            where = f"at step {step}: " + (f"checkpoint {checkpoint}" if checkpoint is not None
                                           else "no checkpoint written")
        super().__init__(f"interrupted by {name} {where}; continue with the same command and --resume (--out {out})")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopNow(KeyboardInterrupt):
    """A second SIGINT / SIGTERM: the run stops where it is, without a checkpoint. It may reach the
    command line wrapped (``torch.save`` turns it into a ``RuntimeError`` that keeps it as context);
    :func:`stop_now_in` finds it. CLIs print one line and exit with :attr:`exit_code`."""

    def __init__(self, signum: int, out: Path):
        self.signum, self.out = signum, out
        super().__init__(f"stopped at once by a second {signal.Signals(signum).name}, without a checkpoint; "
                         f"the earlier checkpoints are kept: continue with the same command and --resume (--out {out})")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def stop_now_in(exc: BaseException) -> Optional[StopNow]:
    """The :class:`StopNow` in ``exc``'s chain of causes and contexts, or None."""
    return in_chain(exc, StopNow)


class NonFiniteError(RuntimeError):
    """Training met a non-finite value (loss or data) and stopped before applying it. One line for the user."""


def finite_loss(loss, step: int, what: str = "") -> float:
    """``float(loss)``; raise :class:`NonFiniteError` naming ``step`` (and ``what``: the run or cell) if it is
    NaN or infinite. Call it between ``backward()`` and ``optimizer.step()``: the model, the optimiser and
    the checkpoints on disk then never hold the result of a non-finite update."""
    value = float(loss)
    if not math.isfinite(value):
        raise NonFiniteError(f"{what + ': ' if what else ''}the loss is {value} at step {step}; stopped before "
                             "applying this update (the earlier checkpoints are intact): look for non-finite "
                             "input data, or lower the learning rate")
    return value


def _json_roundtrip(config: dict) -> dict:
    """The config as it will read back from config.json (tuples become lists, keys strings)."""
    return json.loads(json.dumps(config))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RunError(f"{path} cannot be read ({type(e).__name__}: {e}); remove the folder or pass --overwrite") from None


def write_json(path: Path, obj: Any, *, sort_keys: bool = True) -> Path:
    """Write JSON atomically (:func:`~.atomic.atomic_write`). ``sort_keys`` False keeps the dicts' order
    (for records whose order is meaningful, e.g. a table's rows)."""
    data = (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode()
    return atomic_write(path, lambda f: f.write(data), durable=False)


def ensure_new(path: Path, *, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Raise :class:`RunError` if ``path`` exists and ``overwrite`` is off: an earlier result (an
    evaluation, a figure) is never replaced unless asked. Call it before spending the time to compute."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise RunError(f"{path} already exists (an earlier result); choose another output file or pass {flag}")
    return path


def write_new_json(path: Path, obj: Any, *, overwrite: bool = False, flag: str = "--overwrite") -> Path:
    """Write ``path`` atomically unless it exists (see :func:`ensure_new`)."""
    return write_json(ensure_new(path, overwrite=overwrite, flag=flag), obj)


def _flatten(settings: dict, prefix: str = "") -> dict:
    """Nested dicts as dotted keys (``{"protocol": {"lr": 1}}`` -> ``{"protocol.lr": 1}``); empty ones stay."""
    flat = {}
    for k, v in settings.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def changed_settings(old: dict, new: dict, ignore: Iterable[str] = ()) -> dict:
    """``{key: (old, new)}`` for every setting that differs, apart from operational ones and ``ignore``
    (both top-level names). Nested settings are compared key by key (``protocol.lr``), so that a refusal
    names the one value that changed rather than the whole group."""
    skip = OPERATIONAL | set(ignore)
    a = _flatten({k: v for k, v in old.items() if k not in skip})
    b = _flatten({k: v for k, v in new.items() if k not in skip})
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def describe_changes(diff: dict) -> str:
    return ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in diff.items())


class Run:
    """An output folder with its lifecycle; create it with :func:`open_run`.

    Attributes: ``path``, ``config`` (the resolved settings, as stored in ``config.json``),
    ``run_id``, ``state`` (the checkpoint resumed from, or None), ``summary`` (the record of a
    finished run when there is nothing to do, else None), ``rank``.
    """

    def __init__(self, path: Path, config: dict, run_id: str, *, state: Optional[dict] = None,
                 summary: Optional[dict] = None, rank: int = 0, keep_last: int = 2, resumed: bool = False,
                 lock: Optional["_FolderLock"] = None):
        self.path = Path(path)
        self.resumed = resumed          # continues a run that was there (its TensorBoard events included)
        self._lock = lock
        if lock is not None:
            # the folder stays this process's while the Run lives (a run's last records are written after
            # close()); the OS releases it anyway when the process ends
            weakref.finalize(self, lock.release)
        self.config = config
        self.run_id = run_id
        self.state = state
        self.summary = summary
        self.rank = rank
        self.keep_last = keep_last
        self._writer = None
        self._signal: Optional[int] = None
        self._steps: dict = {}          # checkpoint path -> (run_id, step) read from inside the file

    # ------------------------------------------------------------------ state
    @property
    def finished(self) -> bool:
        """True when the folder holds a finished run with these settings: nothing to do."""
        return self.summary is not None

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def start_step(self) -> int:
        return int(self.state["step"]) if self.state is not None else 0

    @property
    def extra(self) -> dict:
        """The trainer-specific counters stored with the checkpoint resumed from ({} for a new run)."""
        return dict(self.state.get("extra", {})) if self.state is not None else {}

    def restore(self, *, model=None, optimizer=None, scheduler=None, rng: bool = True) -> dict:
        """Load the resumed checkpoint into the given objects (no-op for a new run); returns :attr:`extra`."""
        if self.state is not None:
            restore(self.state, model=model, optimizer=optimizer, scheduler=scheduler, rng=rng, rank=self.rank)
        return self.extra

    # ------------------------------------------------------------------ writing
    def save(self, step: int, *, model=None, optimizer=None, scheduler=None, extra: Optional[dict] = None) -> Optional[Path]:
        """Write a checkpoint (rank 0 only; None elsewhere) and keep this run's ``keep_last`` newest. Under
        torch.distributed every rank calls it: the checkpoint holds every rank's RNG states (each rank's
        dropout draws its own), so that each rank resumes exactly."""
        rng_ranks = _gather_rng_states()
        if not self.is_main:
            return None
        path = write_checkpoint(self.checkpoints, run_id=self.run_id, step=step, config=self.config, model=model,
                                optimizer=optimizer, scheduler=scheduler, extra=extra, rng_ranks=rng_ranks)
        self._steps[path] = (self.run_id, int(step))
        self._rotate()
        return path

    def _identify(self, path: Path):
        if path not in self._steps:
            try:
                state = read_checkpoint(path, mmap=True)
                self._steps[path] = (state.get("run_id"), int(state["step"]))
            except CheckpointError:
                self._steps[path] = (None, None)        # unreadable: never ours to delete
        return self._steps[path]

    def _rotate(self) -> None:
        ours = []
        for _, p in step_files(self.checkpoints):
            run_id, step = self._identify(p)
            if run_id == self.run_id and step is not None:
                ours.append((step, p))
        ours.sort(key=lambda t: t[0], reverse=True)
        for _, p in ours[self.keep_last:]:
            p.unlink(missing_ok=True)
            self._steps.pop(p, None)

    def write_json(self, name: str, obj: Any) -> Optional[Path]:
        """Write ``<out>/<name>`` atomically (rank 0 only)."""
        return write_json(self.path / name, obj) if self.is_main else None

    def finish(self, summary: dict) -> Optional[Path]:
        """Write the run's record ``summary.json`` with ``finished: true`` and the settings it ran with."""
        return self.write_json(SUMMARY, {**summary, "finished": True, "config": self.config})

    @property
    def writer(self):
        """A TensorBoard ``SummaryWriter`` on ``<out>/tb`` (rank 0; None elsewhere), created on first use."""
        if not self.is_main:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run logs again the steps after its checkpoint (those of a killed process were
            # logged once already): purge_step makes TensorBoard drop the earlier events from that step on.
            purge = self.start_step + 1 if self.resumed else None
            if self.resumed:
                _after_earlier_event_files(self.path / "tb")
            self._writer = SummaryWriter(log_dir=str(self.path / "tb"), purge_step=purge)
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ interrupts
    @contextmanager
    def interruptible(self, finishing: str = "the current step and writing a checkpoint"):
        """Within this block SIGINT / SIGTERM only set a flag (see :meth:`stop_signal`); a second
        signal raises :class:`StopNow` at once, and later ones are ignored so that the unwinding (which
        removes a half-written checkpoint's temporary file) completes. A signal that :func:`remember_stop`
        kept before the block counts as received at its start. Outside the main thread this does
        nothing. ``finishing``: what the first signal lets complete, as its notice says (a sweep finishes
        its running runs or cells)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self._signal is not None:
                for s in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(s, signal.SIG_IGN)
                raise StopNow(signum, self.path)
            self._signal = signum
            print(f"\nreceived {signal.Signals(signum).name}: finishing {finishing} "
                  "(signal again to stop at once)", file=sys.stderr, flush=True)

        global _stop_before_block
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, handler)
        # (taken once the handlers are set: a signal from here on reaches the handler itself)
        if _stop_before_block is not None:
            signum, _stop_before_block = _stop_before_block, None
            if self._signal is None:
                handler(signum, None)
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def stop_signal(self) -> Optional[int]:
        """The signal that asked the run to stop, or None. Under torch.distributed every rank gets the
        same answer (one small all-reduce), so all of them stop after the same step."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([self._signal or 0], dtype=torch.int64)
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return int(flag.item()) or None
        return self._signal

    def interrupt(self, step: int, save: Callable[[], Optional[Path]]) -> None:
        """If a stop was requested, call ``save()`` (which writes the checkpoint) and raise
        :class:`RunInterrupted`; otherwise return."""
        signum = self.stop_signal()
        if signum is None:
            return
        path = save()
        self.close()
        raise RunInterrupted(signum, step, path, self.path)


# A first stop that reached this process while no interruptible block was open: a sweep's worker was
# passed the sweep's stop while it was still setting its run up (data, model, log writer), before the
# run's own block. The next block starts with it, so that run stops after its first step and writes a
# checkpoint instead of training to its end.
_stop_before_block: Optional[int] = None


def remember_stop(signum, frame) -> None:
    """Signal handler of a process whose run opens its :meth:`Run.interruptible` block later (a sweep's
    worker): the signal is kept for the next block, which starts as if it had been received there."""
    global _stop_before_block
    _stop_before_block = signum


def _gather_rng_states() -> Optional[list]:
    """Every rank's RNG states (rank order) under torch.distributed with several processes, else None."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state())
    return states


def _after_earlier_event_files(tb: Path) -> None:
    """Wait (at most a second) until a new event file's name sorts after the existing ones. TensorBoard
    reads a folder's files in name order, which starts with the creation second: a file of the same second
    could sort first (by host and pid), and then the purge of the resumed steps would hit the new events."""
    seconds = [int(p.name.split(".")[3]) for p in tb.glob("events.out.tfevents.*")
               if len(p.name.split(".")) > 3 and p.name.split(".")[3].isdigit()]
    while seconds and int(time.time()) <= max(seconds):
        time.sleep(0.05)


# ---------------------------------------------------------------------------- opening a run
def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(p.name != LOCK for p in path.iterdir())


class _FolderLock:
    """This process's exclusive ``flock`` on ``<folder>/.lock``. Opening the same folder again in the same
    process shares it (a count), so a process may reopen its own run; other processes are refused."""

    _held: dict = {}                     # (pid, lock file) -> [fd, count]

    def __init__(self, key):
        self.key, self.released = key, False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        entry = self._held.get(self.key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[self.key]
            os.close(entry[0])           # closing the descriptor releases the flock


def _holder(fd: int) -> str:
    """`` (pid N)`` of the process holding the flock on ``fd``'s file, from Linux's /proc/locks ("" elsewhere).
    Read there rather than stored in the lock file, which is then never written: opening a finished run
    changes nothing on disk."""
    try:
        st = os.fstat(fd)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return ""
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF"; waiters are marked "->" and skipped
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where:
            return f" (pid {fields[4]})"
    return ""


def _lock_folder(path: Path) -> Optional[_FolderLock]:
    """Create ``path`` if needed and lock it for this process; RunError if another live process holds it.
    None where the folder cannot be locked: no ``fcntl``, or a read-only file system (where nobody can
    change the folder either)."""
    if path.is_symlink() and not path.exists():
        raise RunError(f"--out {path} is a symbolic link that leads nowhere (to {os.readlink(path)}: missing, "
                       "or a loop); remove it or choose another --out")
    if path.exists() and not path.is_dir():
        raise RunError(f"--out {path} is a file, not a folder")
    if fcntl is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    lock_file = path / LOCK
    key = (os.getpid(), os.path.realpath(lock_file))
    if key in _FolderLock._held:
        _FolderLock._held[key][1] += 1
        return _FolderLock(key)
    cloexec = getattr(os, "O_CLOEXEC", 0)
    refused = None
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | cloexec, 0o666)
    except OSError as e:
        if e.errno == errno.EROFS:
            return None
        if e.errno not in (errno.EACCES, errno.EPERM):
            raise
        # a folder this user may read but not write (a read-only checkout, another user's run): an
        # exclusive flock needs no write access, so the lock file it holds already locks it
        refused = e
        try:
            fd = os.open(lock_file, os.O_RDONLY | cloexec)
        except OSError:
            raise e from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunError(f"the run in {path} is in use by another process{holder}; wait for it "
                           "to end, or choose another --out") from None
        if refused is not None:
            # where flock is emulated by byte-range locks (NFS, SMB), an exclusive lock needs a file
            # open for writing (EBADF otherwise): the folder's permission error is the reason
            raise refused from None
        raise
    _FolderLock._held[key] = [fd, 1]
    return _FolderLock(key)


def _describe(path: Path, checkpoints: bool = True) -> str:
    """Where a run stands, as `` (newest checkpoint ...)``; nothing for a sweep, which keeps no checkpoints."""
    if not checkpoints:
        return ""
    files = step_files(path / CHECKPOINTS)
    return f" (newest checkpoint {files[0][1].name})" if files else " (no checkpoint yet)"


def _newest_intact(folder: Path, run_id: Optional[str], log: Callable[[str], None]) -> Optional[dict]:
    """The newest readable checkpoint of ``run_id`` in ``folder``; unreadable newer ones are reported and
    moved aside to ``<name>.corrupt``. Raises RunError when files exist but none is intact."""
    files = step_files(folder)
    reasons = []
    for _, p in files:
        try:
            state = read_checkpoint(p)
        except CheckpointError as e:
            aside = p.with_name(p.name + ".corrupt")
            os.replace(p, aside)
            log(f"warning: {e}; moved it to {aside.name} and trying the previous checkpoint")
            reasons.append(p.name)
            continue
        if run_id is not None and state.get("run_id") not in (None, run_id):
            log(f"warning: {p} belongs to another run (run_id {state.get('run_id')}); skipped")
            reasons.append(p.name)
            continue
        state["path"] = str(p)
        return state
    if files:
        raise RunError(f"--resume: no intact checkpoint of this run in {folder} (unusable: {', '.join(reasons)})")
    return None


def _clear(path: Path) -> None:
    for child in path.iterdir():
        if child.name == LOCK:           # held by this process: the folder stays ours while it is emptied
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _union(old, new):
    """``new`` added to ``old``: a list keeps old's items and appends new's others; dicts merge key by key."""
    if isinstance(old, list) and isinstance(new, list):
        return old + [v for v in new if v not in old]
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _union(old[k], v) if k in old else v for k, v in new.items()}}
    return new


def _decide(path: Path, config: dict, resume: bool, overwrite: bool, may_change: Iterable[str],
            log: Callable[[str], None], checkpoints: bool = True,
            validate: Optional[Callable[[dict], None]] = None, accumulate: Iterable[str] = ()) -> dict:
    """Rank 0's decision: {"run_id", "state", "summary", "config", "resumed"}; performs the disk changes.
    The caller holds the folder's lock."""
    holds_run = (path / CONFIG).is_file()
    if path.is_dir() and not holds_run and not _is_empty_dir(path):
        raise RunError(f"--out {path} is not empty and holds no run (no {CONFIG}); choose a new or empty folder")
    if holds_run and overwrite:
        # nothing of the old run is read: --overwrite must also replace a run whose records are damaged
        # (the refusal of an unreadable config.json / summary.json names --overwrite as the way out)
        _clear(path)
        log(f"--overwrite: removed the run in {path}")
    elif holds_run:
        old = _read_json(path / CONFIG)
        summary_file = path / SUMMARY
        summary = _read_json(summary_file) if summary_file.is_file() else None
        if (summary is not None and summary.get("finished")
              and not changed_settings(summary.get("config", old), config)):
            # judged against the settings the record was written with: a --resume that extended a
            # finished sweep (more seeds) and was interrupted leaves config.json longer than the record
            return {"run_id": old.get("run_id"), "state": None, "summary": summary, "config": old, "resumed": False}
        diff = changed_settings(old, config, ignore=may_change)
        if not resume and diff:
            # --resume would refuse these settings too: name them, not a way out that does not exist
            raise RunError(f"--out {path} already holds a run{_describe(path, checkpoints)} started with other settings "
                           f"({describe_changes(diff)}): replace it with --overwrite, or choose another --out")
        elif not resume:
            raise RunError(f"--out {path} already holds a run{_describe(path, checkpoints)}: continue it with --resume, "
                           f"replace it with --overwrite, or choose another --out")
        else:
            if diff:
                raise RunError(f"--resume: {path} was started with other settings ({describe_changes(diff)}); "
                               f"use the original values, or start a new run with another --out or --overwrite")
            if validate is not None:
                validate(old)
            abandoned = [p for folder in (path, path / CHECKPOINTS) for p in remove_abandoned(folder)]
            if abandoned:
                log(f"--resume: removed {len(abandoned)} unfinished temporary file(s) that a process killed "
                    f"while writing left in {path} ({', '.join(p.name for p in abandoned)})")
            run_id = old.get("run_id") or uuid.uuid4().hex
            state = _newest_intact(path / CHECKPOINTS, old.get("run_id"), log) if checkpoints else None
            merged = {**config, **{k: _union(old[k], config[k]) for k in accumulate if k in old and k in config},
                      "run_id": run_id}
            write_json(path / CONFIG, merged)          # lengths that grew are recorded
            if summary_file.is_file():
                # the run now does more than its record says: it is not finished until it writes a new one
                summary_file.unlink()
            if state is None and checkpoints:
                log(f"--resume: {path} has no checkpoint yet; starting at step 0")
            elif not checkpoints:
                log(f"--resume: continuing the sweep in {path}")
            return {"run_id": run_id, "state": state, "summary": None, "config": merged, "resumed": True}
    elif resume:
        log(f"--resume: {path} holds no run yet; starting a new one")
    run_id = uuid.uuid4().hex
    merged = {**config, "run_id": run_id}
    if checkpoints:
        (path / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    else:
        path.mkdir(parents=True, exist_ok=True)
    write_json(path / CONFIG, merged)
    return {"run_id": run_id, "state": None, "summary": None, "config": merged, "resumed": False}


def open_run(out: str | os.PathLike, config: dict, *, resume: bool = False, overwrite: bool = False,
             may_change: Iterable[str] = (), keep_last: int = 2, log: Callable[[str], None] = print,
             checkpoints: bool = True, validate: Optional[Callable[[dict], None]] = None,
             accumulate: Iterable[str] = ()) -> Run:
    """Apply the rule of this module's docstring to ``out`` and return the :class:`Run`.

    Args:
        out: the run folder (``--out``).
        config: the resolved settings (JSON-serialisable); compared with the stored ones on resume
            and on re-runs. Keys in :data:`OPERATIONAL` are never compared.
        resume, overwrite: the ``--resume`` / ``--overwrite`` flags (not both).
        may_change: settings that may differ on ``--resume`` because they only extend the run
            (e.g. ``epochs``); the new values are recorded.
        keep_last: checkpoints of this run kept on disk.
        checkpoints: False for a sweep, whose progress is kept in its runs or cells rather than in
            checkpoints of its own: ``--resume`` then neither looks for nor mentions checkpoints.
        validate: on ``--resume``, called with the stored config before anything changes (under the
            folder's lock), for checks beyond equal settings; it raises RunError to refuse.
        accumulate: settings (of ``may_change``) recorded on ``--resume`` as the union of the stored and
            the given values (lists: the stored items, then the new ones; dicts: merged key by key), for
            a sweep whose folder keeps, and whose report reads, whatever earlier runs added to it.
    Raises:
        RunError with a one-line message when the run cannot start as asked.

    Under torch.distributed, rank 0 decides and changes the disk; the other ranks receive its
    decision (and load the same checkpoint), so all ranks resume from the same step.
    """
    if resume and overwrite:
        raise RunError("--resume and --overwrite exclude each other: continue the run, or replace it")
    path = Path(out)
    config = _json_roundtrip(dict(config))
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    decision, error, lock = None, None, None
    if rank == 0:
        try:
            lock = _lock_folder(path)            # before anything in the folder is read, written or deleted
            decision = _decide(path, config, resume, overwrite, may_change, log, checkpoints, validate, accumulate)
        except RunError as e:
            error = str(e)
            if lock is not None:
                lock.release()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    if distributed:
        box = [None if decision is None else {**decision, "state": decision["state"] and decision["state"]["path"]},
               error]
        dist.broadcast_object_list(box, src=0)
        shared, error = box
        if rank != 0 and error is None:
            state_path = shared["state"]
            decision = {**shared, "state": read_checkpoint(state_path) if state_path else None}
    if error is not None:
        raise RunError(error)
    return Run(path, decision["config"], decision["run_id"], state=decision["state"], summary=decision["summary"],
               rank=rank, keep_last=keep_last, resumed=decision["resumed"], lock=lock)
