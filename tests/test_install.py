"""The installed package imports wherever Python runs, also in a folder that holds a clone of the
repository named ``setperm`` (which Python would otherwise take for an empty namespace package)."""
import os
import subprocess
import sys

import pytest

PROBE = "import setperm; print(setperm.__file__); print(setperm.PermutationSetEncoder.__name__)"


def _import_in(folder):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}     # only what is installed
    return subprocess.run([sys.executable, "-c", PROBE], cwd=folder, env=env, capture_output=True, text=True)


def test_installed_package_is_not_shadowed_by_a_clone_named_setperm(tmp_path):
    neutral = tmp_path / "elsewhere"
    neutral.mkdir()
    found = _import_in(neutral)
    if found.returncode != 0:
        pytest.skip("setperm is not installed in this interpreter (tests run from the checkout)")
    parent = tmp_path / "projects"
    (parent / "setperm" / "src").mkdir(parents=True)                   # the clone, as `git clone` names it
    (parent / "setperm" / "README.md").write_text("a clone\n", encoding="utf-8")
    there = _import_in(parent)
    assert there.returncode == 0, there.stderr
    lines = found.stdout.splitlines()           # (lines, not words: the checkout's path may hold spaces)
    assert there.stdout.splitlines() == lines == [lines[0], "PermutationSetEncoder"]
