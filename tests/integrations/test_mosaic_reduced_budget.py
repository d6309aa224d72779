"""integrations/mosaic/reduced_budget.sh: the runs behind the README's tables, run one after the other.

The trainer is replaced by a stub ``python`` on PATH that records its arguments and exits with a chosen
code, so these check the script's own logic (skip, continue, stop) in well under a second."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "integrations" / "mosaic" / "reduced_budget.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run_script(tmp_path, *parts, rc=0):
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    stub = stub_dir / "python"
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{calls}"\nexit {rc}\n', encoding="utf-8")
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub_dir}{os.pathsep}{os.environ.get('PATH', '')}", "OUT": str(tmp_path / "runs")}
    res = subprocess.run(["bash", str(SCRIPT), *parts], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    lines = calls.read_text(encoding="utf-8").splitlines() if calls.is_file() else []
    return res, lines


def test_every_run_is_started_with_resume_so_a_second_invocation_continues_interrupted_runs(tmp_path):
    res, calls = _run_script(tmp_path, "mnist")
    assert res.returncode == 0, res.stderr
    assert len(calls) == 6                                   # 2 tile counts x 3 models
    assert all("--resume" in c.split() and "--out" in c.split() for c in calls)


def test_finished_runs_are_skipped(tmp_path):
    done = tmp_path / "runs" / "mnist-2-linassign"
    done.mkdir(parents=True)
    (done / "summary.json").write_text("{}", encoding="utf-8")
    res, calls = _run_script(tmp_path, "mnist")
    assert res.returncode == 0 and "skip mnist-2-linassign" in res.stdout
    assert len(calls) == 5 and not any("mnist-2-linassign" in c for c in calls)


@pytest.mark.parametrize("code", [130, 143])
def test_an_interrupted_run_stops_the_script_with_its_exit_code(tmp_path, code):
    # Ctrl-C reaches the trainer, which saves a checkpoint and exits 130: the script must not go on
    # to the next run (a classify run would then read an unfinished classifier)
    res, calls = _run_script(tmp_path, "mnist-classify", rc=code)
    assert res.returncode == code
    assert len(calls) == 1 and "mnist-2-pretrain" in calls[0]
    assert "interrupted mnist-2-pretrain" in res.stdout and "start mnist-2-classify" not in res.stdout


def test_a_failed_run_is_reported_and_the_next_one_starts(tmp_path):
    res, calls = _run_script(tmp_path, "tiny", rc=1)
    assert res.returncode == 0
    assert len(calls) == 6 and res.stdout.count("FAILED") == 6 and "exit 1" in res.stdout


def test_an_unknown_part_is_refused(tmp_path):
    res, calls = _run_script(tmp_path, "nonsense")
    assert res.returncode == 2 and "unknown part nonsense" in res.stdout and not calls
