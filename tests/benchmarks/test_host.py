"""benchmarks/host.py: the host's work of the layer on the path it takes on CUDA, on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_the_cuda_path_is_taken_with_the_launches_counted_and_everything_restored_after():
    from setperm import cost, encoder, fused, fused_read, masking

    if not fused.interpreted():
        pytest.skip("the CUDA path runs on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1)")
    from benchmarks.host import cuda_decisions
    from setperm import PermutationOptimization

    before = (cost.host_decisions, encoder.host_decisions, fused._launch, fused_read._launch)
    po = PermutationOptimization(3, cost_hidden=4, steps=2, kernel="fused")
    x = torch.randn(2, 5, 3, requires_grad=True)
    with cuda_decisions() as counter:
        assert not cost.host_decisions(x) and not masking.host_decisions(x)
        po(x).sum().backward()                       # the kernels' outputs are left as allocated
        assert counter["launches"] == 2              # one forward launch, one backward
    assert (cost.host_decisions, encoder.host_decisions, fused._launch, fused_read._launch) == before
    assert cost.host_decisions(x)


def test_tiny_run_times_and_counts_every_row(tmp_path):
    # in its own process: the command chooses Triton's interpreter before Triton is imported
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    done = subprocess.run([sys.executable, "-m", "benchmarks.host", "--tiny", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "host_tiny.json").read_text(encoding="utf-8"))["host"]
    assert len(rows) == 4
    by = {(r["config"], r["impl"]): r for r in rows}
    for (config, impl), row in by.items():
        assert row["fwd_us"] > 0 and row["fb_us"] > 0 and row["cost_us"] > 0 and row["read_us"] > 0
        assert row["ops_fwd"] > 10 and row["ops_bwd"] > 10
        fused_read = impl.endswith("read fused)")
        # the optimisation's kernels launch once each way (one tile at N = 9); the fused read's twice more
        assert row["launches"] == (4 if fused_read else 2), row
    assert "fwd+bwd us" in (tmp_path / "host_tiny.md").read_text(encoding="utf-8")
