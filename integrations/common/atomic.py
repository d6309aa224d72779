"""Atomic file writes and the OS error behind a failure.

A file is written under a temporary name of its own in the target's folder (hidden, with the pid and a
random suffix: two processes never share one) and renamed over the target only when complete. On any
failure, an interrupt included, the temporary file is removed and the target is unchanged; a failure
that comes from the OS (a full disk inside ``torch.save``, which reports it as a ``RuntimeError``) is
raised as an ``OSError`` naming the target, so command lines can say it in one line.
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, List, Optional


def in_chain(exc: Optional[BaseException], kind: type) -> Optional[BaseException]:
    """The first exception of type ``kind`` in ``exc``'s chain (itself, its ``__cause__``, its
    ``__context__``, ...), or None. Errors raised inside C++ code that calls back into Python come out
    wrapped: torch reports a failed write as ``RuntimeError: [enforce fail ...]`` with the cause only in
    the chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def os_error_in(exc: BaseException) -> Optional[OSError]:
    """The ``OSError`` behind ``exc`` (see :func:`in_chain`), or None."""
    return in_chain(exc, OSError)


def _temporary_name(path: Path) -> Path:
    """A new hidden name beside ``path``: the pid and a random suffix, so no other writer draws it."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


# what _temporary_name makes: the target's name, the writer's pid, 8 hex digits
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.tmp")


def _running(pid: int) -> bool:
    """Whether ``pid`` may be a running process: only a lookup that finds none says it is not (a
    process of another user, or a number no pid can be, counts as running, so its file is kept)."""
    try:
        os.kill(pid, 0)                   # signal 0: checks that the process exists, sends nothing
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):
        pass
    return True


def remove_abandoned(folder: str | os.PathLike) -> List[Path]:
    """Remove the temporary files in ``folder`` whose writer no longer runs, and return them.

    :func:`atomic_write` removes its temporary file on every exit a process can handle; one killed
    outright (``kill -9``, the kernel's out-of-memory killer, a power cut) leaves it, under a hidden
    name, as large as the checkpoint it was writing. A file whose writer's pid is still a running
    process (this one included) is left alone. The pid is looked up on this machine, in this process's
    pid namespace: a writer on another machine sharing the folder (NFS), or in another container, looks
    ended. The caller holds the folder's lock, so only a writer that takes none (an ``eval`` writing its
    result into the run folder at that moment) could lose its file. POSIX only (elsewhere checking a pid
    is not side-effect free): returns [] there.
    """
    folder = Path(folder)
    if os.name != "posix" or not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        m = _TEMPORARY.fullmatch(entry.name)
        if m is None or not entry.is_file() or entry.is_symlink() or _running(int(m["pid"])):
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            continue
        removed.append(entry)
    return removed


# O_EXCL: the file is ours alone. Created with mode 0o666 less the umask, as a plain ``open`` would,
# so the renamed file has the usual permissions.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, durable: bool = True) -> Path:
    """Call ``write(f)`` on a temporary binary file beside ``path``, then rename it to ``path``.

    ``durable``: fsync the file and the folder, so that a power cut after the rename keeps the new content
    (checkpoints); small records may skip it. Raises ``OSError`` (with ``filename`` = ``path``) for a failure
    the OS reported; any other exception propagates unchanged. Either way no temporary file is left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: Optional[Path] = None
    try:
        # The name is known before the file exists: an interrupt that lands just after os.open created
        # it (a second signal while the interrupt checkpoint is written) still finds it to remove.
        fd = None
        while fd is None:
            tmp = _temporary_name(path)
            try:
                fd = os.open(tmp, _CREATE, 0o666)
            except FileExistsError:
                continue
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:           # not created yet, or already renamed
                pass
        err = os_error_in(e)
        if err is not None and not (isinstance(e, OSError) and e.filename):
            raise OSError(err.errno, err.strerror or str(err), str(path)) from e
        raise
    if durable:
        fsync_folder(path.parent)
    return path


class _DropAfterClose:
    """``f`` for ``torch.save``, except that a write after ``f`` was closed is dropped. When an exception
    (a second signal, :class:`~.lifecycle.StopNow`) leaves torch's zip writer before it has finished its
    archive, the writer finishes it from its C++ destructor, once the exception has been handled: by then
    :func:`atomic_write` has closed and removed the temporary file, and the error a closed file raises
    inside that destructor would abort the process (``std::terminate``) instead of letting it exit."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def write(self, data) -> int:
        return len(memoryview(data)) if self._f.closed else self._f.write(data)

    def flush(self) -> None:
        if not self._f.closed:
            self._f.flush()


def atomic_torch_save(path: str | os.PathLike, obj, *, durable: bool = True) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write` (same guarantees, same errors)."""
    import torch

    return atomic_write(path, lambda f: torch.save(obj, _DropAfterClose(f)), durable=durable)
