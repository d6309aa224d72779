"""SIGINT / SIGTERM in the three trainers: the current step finishes, a checkpoint is written, one line
says how to continue, the exit code is 130 / 143 without a traceback, and --resume ends with exactly the
weights of an uninterrupted run. Each trainer runs as a real subprocess of its command line."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from integrations.common import load_latest

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("SETPERM_DATA_ROOT", REPO.parent / "shared" / "data"))
ENV = {**os.environ, "SETPERM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}


def _wait_for_checkpoint(proc: subprocess.Popen, folder: Path, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if folder.is_dir() and any(folder.glob("step_*.pt")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("no checkpoint appeared")


def _interrupt(cmd, out: Path, sig: int) -> str:
    proc = subprocess.Popen([sys.executable, "-m", *cmd, "--out", str(out)], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoint(proc, out / "checkpoints")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert f"interrupted by {signal.Signals(sig).name}" in last and "--resume" in last, err
    return err


def _finish(cmd, out: Path, *extra) -> None:
    r = subprocess.run([sys.executable, "-m", *cmd, "--out", str(out), *extra], cwd=REPO, env=ENV, text=True,
                       capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr


def _same_final_weights(a: Path, b: Path) -> None:
    sa, sb = load_latest(a), load_latest(b)
    assert sa["step"] == sb["step"]
    torch.testing.assert_close(sb["model"], sa["model"], rtol=0, atol=0)
    assert sa["config"]["run_id"] != sb["config"]["run_id"]


def _check(cmd, tmp_path: Path, sig: int) -> None:
    _interrupt(cmd, tmp_path / "cut", sig)
    assert not (tmp_path / "cut" / "summary.json").exists() or '"finished": false' in \
        (tmp_path / "cut" / "summary.json").read_text(encoding="utf-8")
    _finish(cmd, tmp_path / "cut", "--resume")
    _finish(cmd, tmp_path / "straight")
    _same_final_weights(tmp_path / "straight", tmp_path / "cut")


@pytest.mark.slow
def test_sorting_interrupt_then_resume(tmp_path):
    cmd = ["integrations.sorting", "train", "-N", "6", "--batch-size", "32", "--train-sets", str(32 * 150),
           "--checkpoint-every", "1", "--threads", "1", "--device", "cpu"]
    _check(cmd, tmp_path, signal.SIGINT)


@pytest.mark.slow
def test_mosaic_interrupt_then_resume(tmp_path):
    if not (DATA / "mnist").exists():
        pytest.skip(f"shared data folder {DATA / 'mnist'} is absent (set SETPERM_DATA_ROOT)")
    cmd = ["integrations.mosaic", "train", "--dataset", "mnist", "--tiles", "2", "--permutation", "po-u",
           "--subset", "256", "--test-subset", "32", "--batch-size", "8", "--epochs", "2", "--checkpoint-every", "1",
           "--data-root", str(DATA), "--device", "cpu"]
    _check(cmd, tmp_path, signal.SIGINT)


@pytest.mark.slow
def test_ban_interrupt_then_resume(tmp_path):
    from integrations.ban.research import synth

    root = synth.generate(tmp_path / "data", images=6, val_images=2, questions=3, seed=1, v_dim=32, fixed=False)
    cmd = ["integrations.ban", "train", "--data-root", str(root), "--permutation", "po-u", "--num-hid", "16",
           "--gamma", "2", "--batch-size", "4", "--workers", "0", "--threads", "1", "--epochs", "12", "--device", "cpu"]
    _check(cmd, tmp_path, signal.SIGTERM)


# ------------------------------------------------------------------ a second signal stops at once
def test_second_signal_inside_the_checkpoint_write_stops_at_once(tmp_path, monkeypatch, capsys):
    """The first SIGTERM asks for a checkpoint; a second one arrives while torch.save is writing it (real
    signals, sent from inside the write). The command exits 143 with one line, the half-written file is
    gone and the earlier checkpoint is intact."""
    from integrations.common import open_run, read_checkpoint, run_command

    out = tmp_path / "run"
    real_save = torch.save
    model = torch.nn.Linear(256, 256)

    class SecondSignalMidWrite:
        def __init__(self, f):
            self.f, self.sent = f, False

        def write(self, b):
            if not self.sent:
                self.sent = True
                self.f.write(b)
                os.kill(os.getpid(), signal.SIGTERM)          # handled before write returns to torch
            return self.f.write(b)

        def flush(self):
            self.f.flush()

    def main(argv):
        run = open_run(out, {"seed": 0}, log=lambda s: None)
        run.save(1, model=model)
        with run.interruptible():
            os.kill(os.getpid(), signal.SIGTERM)                # the first: finish the step, checkpoint
            monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, SecondSignalMidWrite(f), *a, **k))
            run.interrupt(2, lambda: run.save(2, model=model))
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert run_command(main, "prog") == 143
    assert signal.getsignal(signal.SIGTERM) == before          # the handlers of the block are undone
    err = capsys.readouterr().err
    assert "Traceback" not in err and "stopped at once by a second SIGTERM" in err.strip().splitlines()[-1]
    assert str(out) in err.strip().splitlines()[-1]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001.pt"]
    assert read_checkpoint(out / "checkpoints" / "step_00000001.pt")["step"] == 1


@pytest.mark.slow
def test_two_signals_in_quick_succession_keep_the_invariants(tmp_path):
    """Wherever the second SIGTERM lands (in the step, in the checkpoint write, after the exit): exit 143,
    no traceback, no temporary file, every checkpoint loads, and the run continues with --resume."""
    from integrations.common import read_checkpoint

    out = tmp_path / "run"
    cmd = ["integrations.sorting", "train", "-N", "6", "--batch-size", "32", "--train-sets", str(32 * 40),
           "--checkpoint-every", "3", "--threads", "1", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", *cmd, "--out", str(out)], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoint(proc, out / "checkpoints")
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    while proc.poll() is None and not any(out.rglob("*.tmp")) and time.monotonic() - t0 < 5:
        pass                                                    # the interrupt checkpoint's temporary file
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "second SIGTERM" in last or "interrupted by SIGTERM" in last, err
    assert not list(out.rglob("*.tmp"))
    files = list((out / "checkpoints").glob("step_*.pt"))
    assert files and all(read_checkpoint(p)["step"] > 0 for p in files)
    _finish(cmd, out, "--resume")


def test_a_stop_before_torch_finishes_its_archive_does_not_abort_the_process(tmp_path):
    """A second signal that lands as torch.save's zip writer is about to finish its archive leaves the
    finishing to the writer's C++ destructor, after atomic_write has closed the temporary file: the
    process must still exit normally (it aborted with std::terminate), leaving no temporary file."""
    script = f"""
import gc, sys
import torch, torch.serialization as ser
from integrations.common.atomic import atomic_torch_save
from integrations.common.lifecycle import StopNow
import signal

def stop(self, *args):                 # the signal's exception at the first instruction of __exit__
    raise StopNow(signal.SIGTERM, {str(tmp_path)!r})
ser._open_zipfile_writer_buffer.__exit__ = stop
try:
    atomic_torch_save({str(tmp_path / "x.pt")!r}, {{"w": torch.randn(64, 64)}})
except StopNow:
    pass
gc.collect()
sys.exit(143)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, text=True, capture_output=True,
                          timeout=120)
    assert proc.returncode == 143, proc.stderr
    assert not list(tmp_path.iterdir())
