"""integrations.common.pool.run_units: the one scheduler of the sweeps (set_tasks cells, BAN compare / knobs runs)."""
import os
import signal
import time

import pytest

from integrations.common.lifecycle import remember_stop
from integrations.common.pool import run_units


def _nap(seconds, value):
    """A unit: sleeps, then reports what a worker must be: in a process group of its own, remembering the
    SIGINT that passes a stop on (for a run's interruptible block), SIGTERM at its default."""
    time.sleep(seconds)
    return (value, os.getpid(), os.getpgrp() == os.getpid(),
            signal.getsignal(signal.SIGINT) is remember_stop and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)


def _fail(seconds, value):
    time.sleep(seconds)
    raise ValueError(f"unit {value} failed")


def _alive(pid: int) -> bool:
    """Running (a killed worker that is not reaped yet is a zombie: dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_one_job_runs_in_order_in_this_process_and_a_stop_starts_no_new_unit():
    started, results, stop = [], {}, {"signal": None}

    def done(i, result):
        results[i] = result
        if i == 1:
            stop["signal"] = signal.SIGINT

    run_units(_nap, [(0, "a"), (0, "b"), (0, "c")], 1, lambda: stop["signal"], done, on_start=started.append)
    assert started == [0, 1] and [results[i][0] for i in (0, 1)] == ["a", "b"]
    assert results[0][1] == os.getpid()
    with pytest.raises(ValueError, match="jobs"):
        run_units(_nap, [], 0, lambda: None, done)


@pytest.mark.slow       # worker processes that import torch
def test_workers_finish_their_units_through_a_stop_and_start_no_new_one():
    """A stop after the first unit started: the second is never started, and the first, whose worker gets
    the forwarded SIGINT while it runs, finishes and hands its result over."""
    started, results = [], {}

    def start(i):
        started.append(i)

    stop = lambda: signal.SIGTERM if started else None
    t0 = time.monotonic()
    run_units(_nap, [(2.5, "a"), (0, "b"), (0, "c")], 2, stop, results.__setitem__, on_start=start)
    assert started == [0] and list(results) == [0]
    value, pid, own_group, handlers = results[0]
    assert value == "a" and pid != os.getpid() and own_group and handlers
    assert time.monotonic() - t0 >= 2.5


@pytest.mark.slow
def test_a_failed_unit_lets_the_running_ones_finish_then_is_raised():
    results = {}
    with pytest.raises(ValueError, match="unit x failed"):
        run_units(_fail_x, [(0, "x"), (1.5, "a"), (0, "b")], 2, lambda: None, results.__setitem__)
    assert list(results) == [1] and results[1][0] == "a"            # "b" never started


def _fail_x(seconds, value):
    return (_fail if value == "x" else _nap)(seconds, value)


@pytest.mark.slow
def test_a_second_stop_kills_the_workers_at_once():
    """KeyboardInterrupt (what a second signal raises, as StopNow) while units run: the workers are
    killed, not waited for."""
    results, raised = {}, []

    def done(i, result):
        results[i] = result
        raised.append(time.monotonic())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_units(_nap, [(0, "quick"), (60, "slow")], 2, lambda: None, done)
    # timed from the stop, not from the start: the workers' start (importing torch) is not the kill's
    assert time.monotonic() - raised[0] < 30
    pid = results[0][1]
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _run_after_setup(folder, setup_seconds, steps):
    """A unit shaped like a sweep's training run: a setup (data, model) after its run folder is opened and
    before its interruptible block, then steps until a stop; returns how many steps ran. The setup lasts
    until the worker has received a stop (at most ``setup_seconds``), so that on a loaded machine too the
    stop lands before the block, which is the case under test."""
    from integrations.common import lifecycle, open_run

    run = open_run(folder, {"seed": 0}, log=lambda s: None)
    deadline = time.monotonic() + setup_seconds
    while lifecycle._stop_before_block is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with run.interruptible():
        for step in range(steps):
            if run.stop_signal() is not None:
                return step
            time.sleep(0.05)
    return steps


@pytest.mark.slow
def test_a_stop_that_reaches_a_worker_before_its_run_is_interruptible_stops_that_run(tmp_path):
    """The stop is passed on while the unit is still setting its run up (the sweep's Ctrl-C in the first
    seconds of a run): the run must take it when its block opens, not ignore it and train to the end."""
    started, results = [], {}
    stop = lambda: signal.SIGINT if started else None
    run_units(_run_after_setup, [(tmp_path / "run", 60.0, 400)], 2, stop, results.__setitem__, on_start=started.append)
    assert started == [0] and results[0] == 0
