"""benchmarks/allocations.py: the CPU allocator's peak of one call and the blocks alive at it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.allocations import peak_allocated

REPO = Path(__file__).resolve().parents[2]
MIB = 2 ** 20


def test_the_peak_is_what_is_alive_at_once_above_what_was_allocated_before():
    before = torch.ones(3 * MIB // 4)                       # allocated before the call: not counted

    def call():
        a = torch.empty(MIB)                                 # 4 MiB
        b = torch.empty(2 * MIB)                             # 8 MiB: 12 alive
        del a
        c = torch.empty(MIB // 2)                            # 2 MiB: 10 alive
        big = torch.zeros(MIB // 4)                          # 1 MiB: 11, below the peak
        return b, c, big
    peak, parts = peak_allocated(call)
    assert 12 * MIB <= peak < 12 * MIB + 64 * 1024
    named = dict(parts)
    assert named["aten::empty"] == 12 * MIB and "aten::zeros" not in named
    assert before.numel()


def test_tiny_run_counts_every_row_and_names_the_read_that_allocated(tmp_path):
    # in its own process: the command chooses Triton's interpreter before Triton is imported, which a
    # test process on a CUDA machine must not
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    done = subprocess.run([sys.executable, "-m", "benchmarks.allocations", "--tiny", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "allocations_tiny.json").read_text(encoding="utf-8"))
    rows = {(r["config"], r["impl"], r["mode"]): r for r in data["layer"]}
    assert len(rows) == 2 * 2 * 2
    for (config, impl, mode), row in rows.items():
        assert "note" not in row, row                       # the fused kernels ran, in the interpreter
        assert row["peak_mib"] > 0
        assert sum(size for _, size in row["blocks"]) <= row["peak_mib"] * MIB
        if mode == "fwd+bwd":
            assert row["peak_mib"] >= rows[(config, impl, "fwd")]["peak_mib"]
    # the blocks are named by the operation that allocated them: the fused read's only where it ran
    named = {}
    for (config, impl, mode), row in rows.items():
        named.setdefault((config, impl), set()).update(name for name, _ in row["blocks"])
    for (config, impl), names in named.items():
        assert ("_FusedLSTMRead" in names) == (impl == "setperm (fused, read fused)"), names
    assert "peak MiB" in (tmp_path / "allocations_tiny.md").read_text(encoding="utf-8")
