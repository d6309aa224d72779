"""The repository stands alone: its documents and stored results name no folder of one machine."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# an absolute path into a machine's own folders (a temporary folder, a home, a mount, a work tree)
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:tmp|root|home|Users|mnt|media|opt|srv|scratch|work|check|data)/\S*")


def _tracked(suffixes):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are not known")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in listed.decode().split("\0") if name.endswith(suffixes)]


def test_documents_and_stored_results_name_no_folder_of_one_machine():
    found = []
    for path in _tracked((".md", ".json", ".txt", ".csv", ".toml", ".cfg")):
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            found += [f"{path.relative_to(REPO)}:{number}: {hit.group(0)}" for hit in MACHINE_PATH.finditer(line)]
    assert not found, "\n".join(found[:20])


def test_the_pattern_finds_machine_folders_and_spares_the_project_s_own():
    hits = [bool(MACHINE_PATH.search(text)) for text in
            ('"out": "/tmp/alloc"', "saved in /home/me/runs", "/srv/checkout/src/setperm", '"out": "benchmarks/results"',
             "runs/tmp/x", "src/setperm/data/", "https://example.org/home/page", "~/venvs/setperm")]
    assert hits == [True, True, True, False, False, False, False, False]
