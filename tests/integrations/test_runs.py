"""The run rule's guards (README "Runs"): one live process per run folder, OS failures as one line with
no temporary file left, a non-finite loss stops before its update, TensorBoard without duplicate steps
after a resume."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from integrations.common import (NonFiniteError, RunError, finite_loss, load_latest, open_run, read_checkpoint,
                                 run_command)
from integrations.common import atomic
from integrations.common.lifecycle import LOCK

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SETPERM_PROGRESS": "0"}     # PYTHONPATH: see conftest.py
CFG = {"lr": 0.1, "seed": 0, "threads": 1}
QUIET = dict(log=lambda s: None)

# Opens (or continues) a run in --out (argv[1]), says so on stdout, then holds it until killed or for argv[2] seconds.
HOLDER = """
import sys, time
from integrations.common import open_run
run = open_run(sys.argv[1], {"lr": 0.1, "seed": 0, "threads": 1}, resume=True, log=lambda s: None)
print("open", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _holder(out: Path, seconds: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(seconds)], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "open", proc.communicate()
    return proc


def _tmp_files(folder: Path) -> list:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------ one live process per folder
def test_a_run_in_use_by_a_live_process_is_refused_at_once_even_with_overwrite(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        files = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        for flags in ((), ("resume",), ("overwrite",)):
            t0 = time.monotonic()
            with pytest.raises(RunError) as err:
                open_run(out, CFG, **{f: True for f in flags}, **QUIET)
            assert time.monotonic() - t0 < 30          # refused, not waiting for the 60 s holder
            msg = str(err.value)
            assert f"in {out} is in use by another process" in msg and "\n" not in msg
            if Path("/proc/locks").is_file():
                assert f"pid {holder.pid}" in msg
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == files     # nothing read-modified or deleted
    finally:
        holder.kill()
        holder.wait()
    # the OS released the lock with the process: the folder is usable again
    run = open_run(out, CFG, resume=True, **QUIET)
    assert run.config["run_id"]


def test_the_second_command_is_refused_with_one_line_and_exit_1(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        r = subprocess.run([sys.executable, "-m", "integrations.sorting", "train", "-N", "4", "--batch-size", "8",
                            "--train-sets", "16", "--threads", "1", "--device", "cpu", "--resume", "--out", str(out)],
                           cwd=REPO, env=ENV, text=True, capture_output=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "in use by another process" in r.stderr
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_fresh_start_race_leaves_one_run(tmp_path):
    # two processes start on the same new folder at the same moment: exactly one opens it, the other is
    # refused while the first holds it (each holds until killed, so the order of their imports cannot matter)
    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "120"], cwd=REPO, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    try:
        t0 = time.monotonic()
        while all(p.poll() is None for p in procs) and time.monotonic() - t0 < 120:
            time.sleep(0.05)
        refused = [p for p in procs if p.poll() is not None]
        assert len(refused) == 1, "neither process was refused"
        holder = next(p for p in procs if p is not refused[0])
        assert holder.poll() is None and holder.stdout.readline().strip() == "open"
        assert "in use by another process" in refused[0].communicate()[1]
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert json.loads((out / "config.json").read_text(encoding="utf-8"))["run_id"]


def test_the_lock_file_does_not_make_a_folder_hold_something_else(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).touch()                  # left by a command that was refused or ended
    run = open_run(out, CFG, **QUIET)
    assert (out / "config.json").is_file()
    del run
    again = open_run(out, CFG, overwrite=True, **QUIET)   # --overwrite keeps the lock file it holds
    assert (out / LOCK).is_file() and again.config["run_id"]


def test_the_same_process_may_reopen_its_run_and_the_lock_is_released_with_it(tmp_path):
    out = tmp_path / "run"
    first = open_run(out, CFG, **QUIET)
    second = open_run(out, CFG, resume=True, **QUIET)
    assert second.config["run_id"] == first.config["run_id"]
    del first, second
    proc = _holder(out, 0)                                 # another process can take it now
    assert proc.wait(timeout=60) == 0


# ------------------------------------------------------------------------------ OS errors
def _full_disk(monkeypatch, after: int = 1000):
    """torch.save on a file that takes ``after`` bytes, then fails as a full disk does: ENOSPC, which
    torch reports as a RuntimeError with the OSError in its context."""
    real = torch.save

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > after:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real(obj, Full(f), *a, **k))


def test_a_full_disk_while_checkpointing_is_one_oserror_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    run = open_run(tmp_path / "run", CFG, **QUIET)
    model = torch.nn.Linear(64, 64)
    first = run.save(1, model=model)
    _full_disk(monkeypatch)
    with pytest.raises(OSError) as err:
        run.save(2, model=model)
    assert err.value.errno == errno.ENOSPC and err.value.filename.endswith("step_00000002.pt")
    assert not _tmp_files(tmp_path) and not (run.checkpoints / "step_00000002.pt").exists()
    assert read_checkpoint(first)["step"] == 1                          # the earlier one is intact

    def half_then_full(f):
        f.write(b"x" * 10)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as err:
        atomic.atomic_write(tmp_path / "run" / "x.json", half_then_full)
    assert err.value.filename == str(tmp_path / "run" / "x.json")
    assert not _tmp_files(tmp_path) and not (tmp_path / "run" / "x.json").exists()


def test_run_command_prints_an_os_error_in_one_line_naming_cause_and_path(tmp_path, monkeypatch, capsys):
    _full_disk(monkeypatch)
    out = tmp_path / "run"

    def main(argv):
        run = open_run(out, CFG, **QUIET)
        run.save(1, model=torch.nn.Linear(64, 64))

    assert run_command(main, "prog") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("prog: error: No space left on device: ") and "step_00000001.pt" in err
    assert not _tmp_files(tmp_path)


def test_run_command_leaves_other_runtime_errors_to_their_traceback():
    def main(argv):
        raise RuntimeError("a defect")

    with pytest.raises(RuntimeError, match="a defect"):
        run_command(main, "prog")


def test_a_kernel_that_cannot_be_built_here_is_one_line(tmp_path, monkeypatch, capsys, build_failure):
    """``--kernel compiled`` where torch.compile cannot build it (no C++ compiler, say): the cause in
    one line and exit 1, not a traceback."""
    from integrations.sorting.cli import main as sorting_main
    import setperm.pairwise as pairwise_mod

    def broken(*args):
        raise build_failure("no C++ compiler")

    monkeypatch.setattr(pairwise_mod, "_compiled", lambda fn: broken)
    assert run_command(sorting_main, "prog", ["train", "--set-size", "5", "--train-sets", "128", "--batch-size", "64",
                                              "--kernel", "compiled", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("prog: error: kernel='compiled' could not be compiled")
    assert "Cause: RuntimeError: no C++ compiler" in last


def test_dangling_symlink_and_loop_as_out_are_one_line(tmp_path, capsys):
    dangling, loop = tmp_path / "dangling", tmp_path / "loop"
    dangling.symlink_to(tmp_path / "missing")
    loop.symlink_to(loop)
    for out in (dangling, loop):
        assert run_command(lambda argv: open_run(out, CFG, **QUIET), "prog") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(out) in err and "symbolic link" in err


def test_a_read_only_out_is_one_line(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):                            # root: the OS's refusal, as another user gets it
            real_mkdir = os.mkdir

            def mkdir_as_another_user(path, *args, **kwargs):
                if Path(path).parent == ro:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                return real_mkdir(path, *args, **kwargs)

            monkeypatch.setattr(os, "mkdir", mkdir_as_another_user)
        assert run_command(lambda argv: open_run(ro / "run", CFG, **QUIET), "prog") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("prog: error: Permission denied: ") and str(ro) in err
    finally:
        ro.chmod(0o755)


FINISHED_ELSEWHERE = """
import sys
from integrations.common import RunError, open_run
try:
    open_run(sys.argv[1], {"lr": 0.1, "seed": 0, "threads": 1}, log=lambda s: None)
except RunError as e:
    print(e)
"""


def test_a_finished_run_this_user_may_read_but_not_write_gives_its_summary(tmp_path, monkeypatch):
    """A finished run in a folder this user cannot write (a read-only checkout, another user's run): the
    same settings give its record and change nothing, and the folder is still locked against a second
    process (an exclusive flock needs no write access: the lock file there is opened for reading)."""
    out = tmp_path / "run"
    run = open_run(out, CFG, **QUIET)
    run.finish({"loss": 0.5})
    del run                                                   # (releases the folder's lock)
    from integrations.common.lifecycle import _FolderLock
    assert (os.getpid(), os.path.realpath(out / LOCK)) not in _FolderLock._held
    folders = [out, *(p for p in out.rglob("*") if p.is_dir())]
    files = [p for p in out.rglob("*") if p.is_file()]
    for f in files:
        f.chmod(0o444)
    for d in folders:
        d.chmod(0o555)
    try:
        if os.access(out / LOCK, os.W_OK):                    # root: the OS's refusal, as another user gets it
            real_open = os.open

            def open_as_another_user(path, flags, *args, **kwargs):
                if Path(path).parent == out and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
                return real_open(path, flags, *args, **kwargs)

            monkeypatch.setattr(os, "open", open_as_another_user)
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
        again = open_run(out, CFG, **QUIET)
        assert again.finished and again.summary["loss"] == 0.5
        monkeypatch.undo()
        r = subprocess.run([sys.executable, "-c", FINISHED_ELSEWHERE, str(out)], cwd=REPO, env=ENV, text=True,
                           capture_output=True, timeout=120)
        assert r.returncode == 0 and f"in {out} is in use by another process" in r.stdout, r.stdout + r.stderr
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
        del again
    finally:
        for d in folders:
            d.chmod(0o755)
        for f in files:
            f.chmod(0o644)


def test_a_read_only_lock_file_that_the_file_system_will_not_lock_is_the_permission_error(tmp_path, capsys,
                                                                                          monkeypatch):
    """Where flock is emulated by byte-range locks (NFS, SMB), an exclusive lock needs the file open for
    writing: the lock file of a folder this user cannot write, opened for reading, is refused (EBADF).
    That is the folder's permission error, in one line naming the lock file, not 'Bad file descriptor'."""
    from integrations.common import lifecycle

    fcntl = pytest.importorskip("fcntl")                       # (where it is missing, no folder is locked)

    out = tmp_path / "run"
    open_run(out, CFG, **QUIET).finish({"loss": 0.5})
    real_open, real_flock = os.open, fcntl.flock

    def open_as_another_user(path, flags, *args, **kwargs):
        if Path(path).parent == out and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    def flock_as_nfs(fd, operation):
        if operation & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return real_flock(fd, operation)

    monkeypatch.setattr(os, "open", open_as_another_user)
    monkeypatch.setattr(lifecycle.fcntl, "flock", flock_as_nfs)
    assert run_command(lambda argv: open_run(out, CFG, **QUIET), "prog") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prog: error: Permission denied: ") and str(out / LOCK) in err, err


@pytest.mark.parametrize("code, path", [(errno.EACCES, "/data/run"), (errno.EROFS, "/mnt/ro/run/.lock"),
                                        (errno.ELOOP, "/a/loop")])
def test_each_os_error_is_its_reason_and_path(code, path, capsys):
    def main(argv):
        try:
            raise OSError(code, os.strerror(code), path)
        except OSError as e:
            raise RuntimeError("[enforce fail at somewhere]") from e      # wrapped, as torch does

    assert run_command(main, "prog") == 1
    assert capsys.readouterr().err == f"prog: error: {os.strerror(code)}: {path}\n"


# ------------------------------------------------------------------------------ non-finite losses
def test_finite_loss_names_the_step_and_passes_finite_values():
    assert finite_loss(torch.tensor(0.5), 3) == 0.5
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteError, match=r"cell a/b: the loss is .* at step 7; stopped before"):
            finite_loss(torch.tensor(bad), 7, "cell a/b")


def test_sorting_stops_on_a_non_finite_loss_before_the_update(tmp_path, monkeypatch):
    import integrations.sorting.train as sorting_train

    cfg = dict(set_size=4, permutation="po-u", steps=2, lr=0.1, batch_size=8, cost_hidden=8, eta_init=1.0,
               sinkhorn_iters=4, temperature=1.0, seed=0, device="cpu", resume=False, overwrite=False, checkpoint_every=2,
               stop_at=None, threads=None, micro_batch=None, train_sets=8 * 6, out=str(tmp_path / "run"))
    real = sorting_train.accumulate_gradients
    calls = []

    def poisoned(model, x, micro):
        calls.append(1)
        loss = real(model, x, micro)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(sorting_train, "accumulate_gradients", poisoned)
    with pytest.raises(NonFiniteError, match="at step 3"):
        sorting_train.train(cfg, log=lambda s: None)
    kept = load_latest(tmp_path / "run")
    assert kept["step"] == 2 and all(torch.isfinite(v).all() for v in kept["model"].values())
    monkeypatch.setattr(sorting_train, "accumulate_gradients", real)
    assert sorting_train.train({**cfg, "resume": True}, log=lambda s: None)["finished"]


# ------------------------------------------------------------------------------ TensorBoard after a kill
def _scalars(tb: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_resume_after_a_kill_logs_each_step_once(tmp_path):
    # a process logs steps 1-7, checkpoints at 4 and is killed; the resumed run logs 5-10 again
    out = tmp_path / "run"
    script = f"""
import os, signal, torch
from integrations.common import open_run
run = open_run({str(out)!r}, {CFG!r}, log=lambda s: None)
for step in range(1, 8):
    run.writer.add_scalar("train/loss", 1.0 / step, step)
    if step == 4:
        run.save(step, model=torch.nn.Linear(2, 2))
run.writer.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert _scalars(out / "tb")["train/loss"] == list(range(1, 8))
    run = open_run(out, CFG, resume=True, **QUIET)
    assert run.start_step == 4
    for step in range(5, 11):
        run.writer.add_scalar("train/loss", 2.0 / step, step)
    run.close()
    assert _scalars(out / "tb")["train/loss"] == list(range(1, 11))


# ------------------------------------------------------------------------------ a writer killed outright
KILLED_WRITER = """
import sys, time, torch
from integrations.common import open_run
run = open_run(sys.argv[1], {"lr": 0.1, "seed": 0, "threads": 1}, resume=True, log=lambda s: None)
model = torch.nn.Linear(64, 64)
run.save(1, model=model)
real = torch.save
def stalled(obj, f, *a, **k):
    f.write(b"half a checkpoint")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)
torch.save = stalled
run.save(2, model=model)
"""


@pytest.mark.slow      # kills a process
def test_resume_removes_the_temporary_file_of_a_process_killed_while_writing(tmp_path):
    """A process killed outright (SIGKILL: no handler runs) while it writes a checkpoint leaves its
    temporary file; ``--resume`` removes it, says so, and continues from the intact checkpoint."""
    import signal

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == "writing", proc.communicate()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    left = _tmp_files(out)
    assert len(left) == 1 and left[0].parent == out / "checkpoints", left
    said = []
    run = open_run(out, CFG, resume=True, log=said.append)
    assert not _tmp_files(out) and run.start_step == 1
    assert any("removed 1 unfinished temporary file" in s and left[0].name in s for s in said), said


def test_remove_abandoned_leaves_files_of_running_writers_and_other_names(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    names = {f".step_00000002.pt.{dead}.0123abcd.tmp": False,              # its writer has ended: removed
             f".config.json.{os.getpid()}.89abcdef.tmp": True,              # a running writer's (this one)
             f".step_00000003.pt.{dead}.0123abcd.tmp.keep": True,           # other names
             f"step.{dead}.0123abcd.tmp": True, ".hidden": True, "notes.tmp": True}
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = atomic.remove_abandoned(tmp_path)
    if os.name != "posix":
        assert removed == []
        return
    assert sorted(p.name for p in removed) == sorted(n for n, kept in names.items() if not kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, kept in names.items() if kept)
    assert atomic.remove_abandoned(tmp_path / "missing") == []
