"""benchmarks/flops.py: FLOPs counted on the meta device (tiny sizes, the released module a stand-in)."""
import json
import os
import sys

import pytest
import torch

from benchmarks import flops


def test_count_flops_counts_a_matrix_product_and_not_elementwise_work(flop_counter):
    a, b = torch.ones(3, 5, device="meta"), torch.ones(5, 7, device="meta")
    assert flops.count_flops(lambda: a @ b) == 2 * 3 * 5 * 7
    assert flops.count_flops(lambda: (a.exp() + 1).relu()) == 0
    w = torch.ones(5, 7, device="meta", requires_grad=True)
    assert flops.count_flops(lambda: (a @ w).sum().backward()) == 2 * (2 * 3 * 5 * 7)   # forward + dL/dw


def test_tiny_run_writes_every_row(tmp_path, flop_counter, on_meta, released_stand_in, capsys, monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))     # a busy machine: nothing is timed
    with on_meta():
        assert flops.main(["--tiny", "--perm-optim-root", str(released_stand_in), "--released-features", "6",
                           "--ban-batches", "2", "--out", str(tmp_path / "out")]) == 0
    data = json.loads((tmp_path / "out" / "flops_tiny.json").read_text(encoding="utf-8"))
    assert [r["impl"] for r in data["layer"][:3]] == ["setperm", "reference", "released PermNet"]
    for row in data["layer"]:
        assert 0 < row["fwd_gflop"] < row["fb_gflop"], row
        if row["impl"] == "setperm":
            assert row["vs_setperm"] == 1 and 0 < row["po_gflop"] < row["fb_gflop"]
            assert row["po_gflop"] + row["rest_gflop"] == pytest.approx(row["fb_gflop"])
        elif row["impl"] == "reference":
            assert row["vs_setperm"] > 1        # it evaluates the pairwise MLP on every pair
    assert [r["model"] for r in data["ban"]] == ["BAN", "BAN + LSTM", "BAN + PO-U"]
    base, lstm, po_u = data["ban"]
    assert base["ratio"] == 1 and base["added_gflop"] is None and len(base["per_batch_gflop"]) == 2
    assert 0 < lstm["added_gflop"] < po_u["added_gflop"]       # PO-U: the LSTM and the optimisation
    assert po_u["fb_gflop"] == pytest.approx(base["fb_gflop"] + po_u["added_gflop"])
    table = (tmp_path / "out" / "flops_tiny.md").read_text(encoding="utf-8")
    assert "python -m benchmarks.flops --tiny --perm-optim-root" in table and "BAN + PO-U" in table
    assert "load average" not in capsys.readouterr().err      # no warning about timings it does not take


def test_bad_arguments_are_refused(capsys, tmp_path):
    assert flops.main(["--tiny", "--perm-optim-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "not a checkout of github Cyanogenoid/perm-optim" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        flops.main(["--tiny", "--ban-batches", "0"])


def test_a_torch_that_cannot_count_the_layer_is_named_in_one_line(capsys, tmp_path, monkeypatch):
    pytest.importorskip("torch.utils.flop_counter", reason="torch 2.1 and newer count FLOPs (2.0 is named otherwise)")

    def fails(fn):
        raise TypeError("mm_flop() got multiple values for keyword argument 'out'")
    monkeypatch.setattr(flops, "count_flops", fails)          # as the counter of torch 2.1 - 2.3 fails
    assert flops.main(["--tiny", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot count the layer on the meta device: mm_flop()" in err
    assert not (tmp_path / "o").exists()


def test_a_torch_without_a_flop_counter_is_named_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.flop_counter", None)     # as on torch 2.0: not importable
    assert flops.main(["--tiny", "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no FLOP counter" in err
