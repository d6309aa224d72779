"""The units of a sweep (its cells or its runs) side by side in worker processes, with one interrupt rule.

:func:`run_units` calls ``work(*unit)`` for every unit, in this process (``jobs`` = 1) or in ``jobs``
spawned worker processes, and hands each result to ``on_done`` in this process as it arrives. The
caller runs it inside :meth:`Run.interruptible <integrations.common.Run.interruptible>` and passes
:meth:`Run.stop_signal <integrations.common.Run.stop_signal>` as ``stop``:

* A first SIGINT / SIGTERM: no new unit starts; each worker gets one SIGINT and the running units
  finish and are written. A unit that handles signals itself (a training run inside its own
  ``Run.interruptible``) finishes its step and writes a checkpoint, also when the SIGINT came while it
  was still setting the run up (before its block: the block starts with it, see
  :func:`~integrations.common.lifecycle.remember_stop`); a unit that does not (a cell) is not disturbed,
  because outside such a block the workers only remember SIGINT. Every worker is in a process group
  of its own, so a Ctrl-C at the terminal reaches only the scheduling process, which passes the stop
  on once: a second signal to a training run would stop it without a checkpoint. SIGINT rather than
  SIGTERM is passed on so that SIGTERM keeps its default in the workers and their own children (a
  data loader's processes), which are then still ended by it.
* A second signal (:class:`~integrations.common.StopNow` raised here) stops the workers at once: each
  gets SIGTERM, which a training run takes as its own second signal (it stops where it is and removes
  the temporary file of a checkpoint it was writing) and which ends a cell's worker outright; a worker
  still alive after :data:`GRACE_SECONDS` is killed. Files are written atomically, so none is left
  half-written under its name.
* A unit that raises: no new unit starts, the running units are asked to stop as by a first signal
  and finish, then the exception is raised here.
"""
from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Callable, Optional, Sequence

from .lifecycle import remember_stop

# How often the scheduler looks at the stop request while every worker is busy.
POLL_SECONDS = 1.0
# How long a worker has, after a second signal, to remove its temporary files before it is killed.
GRACE_SECONDS = 5.0


def _worker_start(pids) -> None:
    """Worker initializer: a process group of its own (a Ctrl-C at the terminal does not reach it), the
    SIGINT that passes a stop on is only remembered outside a unit's own handler (a run that opens its
    interruptible block later starts it with the stop), and the pid is reported so that the scheduler
    can signal this worker."""
    os.setpgrp()
    signal.signal(signal.SIGINT, remember_stop)
    pids.put(os.getpid())


class _Workers:
    """The pids of the pool's workers, as they report themselves once SIGINT no longer interrupts them
    (a worker that is still starting would be killed by it), and which of them were told to stop."""

    def __init__(self, pids):
        self.queue, self.pids, self.told = pids, set(), set()
        self.others = set(multiprocessing.active_children())      # child processes that are not the pool's

    def _collect(self) -> None:
        while True:
            try:
                self.pids.add(self.queue.get_nowait())
            except queue_module.Empty:
                return

    def ask_to_stop(self) -> None:
        """One SIGINT to every worker not told before (a worker that reports itself later is told on
        the next call)."""
        self._collect()
        for pid in sorted(self.pids - self.told):
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:          # the worker has exited
                pass
            self.told.add(pid)

    def stop_now(self) -> None:
        """SIGTERM every worker, also one that has not reported itself yet; SIGKILL those that have not
        ended within :data:`GRACE_SECONDS`."""
        procs = [p for p in multiprocessing.active_children() if p not in self.others]
        for proc in procs:
            proc.terminate()
        deadline = time.monotonic() + GRACE_SECONDS
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()


def run_units(work: Callable, units: Sequence[tuple], jobs: int, stop: Callable[[], Optional[int]],
              on_done: Callable[[int, object], None], *, on_start: Optional[Callable[[int], None]] = None,
              more: Callable[[], bool] = lambda: True) -> None:
    """Call ``work(*units[i])`` for each ``i`` in order and ``on_done(i, result)`` as each finishes.

    ``jobs``: worker processes (1: everything in this process). ``work`` and the units must be picklable
    for ``jobs`` > 1. ``stop()``: the signal that asked to stop, or None; once it is set, or ``more()``
    is False, no unit starts (see the module's interrupt rule). ``on_start(i)`` is called as unit ``i``
    starts. Returns when no unit runs any more; the caller checks ``stop()`` for an
    interrupted sweep. Raises ``ValueError`` for ``jobs`` < 1."""
    if jobs < 1:
        raise ValueError(f"jobs must be a positive int, got {jobs}")
    if jobs == 1:
        for i, unit in enumerate(units):
            if stop() is not None or not more():
                return
            if on_start is not None:
                on_start(i)
            on_done(i, work(*unit))
        return
    context = get_context("spawn")      # fork would copy the parent's torch threads and signal handlers
    workers = _Workers(context.Queue())
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_start,
                               initargs=(workers.queue,))
    todo, running, failure = list(range(len(units))), {}, None
    try:
        while todo or running:
            while todo and len(running) < jobs and stop() is None and more() and failure is None:
                i = todo.pop(0)
                if on_start is not None:
                    on_start(i)
                running[pool.submit(work, *units[i])] = i
            if not running:
                break
            finished, _ = wait(list(running), timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
            for fut in finished:
                i = running.pop(fut)
                try:
                    result = fut.result()
                except Exception as e:           # the first failure is raised once the others finished
                    failure = failure or e
                    continue
                on_done(i, result)
            if stop() is not None or failure is not None:
                workers.ask_to_stop()
    except BaseException:
        # a second signal, or a failure in on_done: stop now, not after the running units
        workers.stop_now()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if failure is not None:
        raise failure
