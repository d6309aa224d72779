"""python -m integrations.ban diagnose: the statistics as functions of tensors (a P that is the x-sort of the boxes
has |rho| = 1 and entropy 0, attention on the asked boxes has mass 1, padding changes nothing), and the diagnosis
of tiny BAN / BAN + PO-U runs of a compare sweep (ranges, every family, no P statistics without P, the report files
and the refusal to overwrite)."""
import json
import math
import shutil

import pytest
import torch

from integrations.ban.cli import main
from integrations.ban.research import synth
from integrations.ban.research.diagnose import (attention_mass, diagnose_run, diagnose_sweep, hard_positions,
                                                relative_entropy, set_rank_correlation)
from integrations.common import RunError
from setperm.functional import permutation_entropy

FLAGS = ["--num-hid", "16", "--gamma", "2", "--batch-size", "4", "--workers", "0", "--threads", "1", "--epochs", "1"]


# ------------------------------------------------------------------------------------- the statistics
def _sort_permutation(values, n_total, descending=False):
    """P (N, N) putting the first len(values) elements in the order of ``values``; padding on the tail."""
    order = torch.argsort(values, descending=descending)
    P = torch.zeros(n_total, n_total, dtype=torch.float64)
    P[order, torch.arange(len(values))] = 1.0
    for k in range(len(values), n_total):
        P[k, k] = 1.0
    return P


@pytest.mark.parametrize("descending", [False, True])
def test_exact_x_sort_gives_abs_spearman_one_and_zero_entropy(descending):
    g = torch.Generator().manual_seed(0)
    n, N = 7, 10
    x = torch.rand(n, generator=g, dtype=torch.float64)
    area = torch.rand(n, generator=g, dtype=torch.float64)
    P = _sort_permutation(x, N, descending)[None]
    mask = torch.zeros(1, N, dtype=torch.bool)
    mask[0, :n] = True
    # padded boxes carry garbage values: they must not enter the statistic
    values = torch.cat([x, torch.tensor([5.0, -3.0, 0.5], dtype=torch.float64)])[None]
    pos = hard_positions(P, mask)
    rho = set_rank_correlation(pos, values, mask)
    torch.testing.assert_close(rho, torch.tensor([-1.0 if descending else 1.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # padded == unpadded
    rho_unpadded = set_rank_correlation(hard_positions(P[:, :n, :n]), x[None], torch.ones(1, n, dtype=torch.bool))
    torch.testing.assert_close(rho, rho_unpadded, rtol=0, atol=1e-12)
    # the same order against an unrelated value is not a perfect correlation
    assert abs(float(set_rank_correlation(pos, torch.cat([area, torch.zeros(3, dtype=torch.float64)])[None],
                                          mask))) < 1 - 1e-6
    torch.testing.assert_close(permutation_entropy(P, mask), torch.zeros(1, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(relative_entropy(P, mask), torch.zeros(1, dtype=torch.float64), rtol=0, atol=0)


def test_uniform_permutation_has_relative_entropy_one_and_small_sets_are_skipped():
    n, N = 5, 8
    P = torch.zeros(2, N, N, dtype=torch.float64)
    P[:, :n, :n] = 1.0 / n
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[0, :n] = True
    mask[1, :1] = True                      # one box: no entropy scale, no rank correlation
    rel = relative_entropy(P, mask)
    torch.testing.assert_close(rel[0], torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)
    assert math.isnan(float(rel[1]))
    pos = torch.arange(N).expand(2, N)
    rho = set_rank_correlation(pos, torch.rand(2, N, dtype=torch.float64), mask)
    assert not math.isnan(float(rho[0])) and math.isnan(float(rho[1]))


def test_rank_correlation_matches_scipy_spearman_per_set_with_ties_and_masks():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(2)
    B, N = 6, 9
    positions = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    values = torch.randint(0, 4, (B, N), generator=g).double()          # many ties
    mask = torch.rand(B, N, generator=g) < 0.8
    mask[0] = True
    mask[1, 2:] = False                                                 # 2 elements: skipped
    rho = set_rank_correlation(positions, values, mask)
    for b in range(B):
        sel = mask[b]
        if int(sel.sum()) < 3 or len(set(values[b][sel].tolist())) < 2:
            assert math.isnan(float(rho[b]))
        else:
            ref = spearmanr(positions[b][sel].numpy(), values[b][sel].numpy()).statistic
            assert float(rho[b]) == pytest.approx(ref, abs=1e-12)


def test_attention_mass_is_the_share_on_the_asked_boxes():
    g = torch.Generator().manual_seed(1)
    B, G, K, T = 3, 2, 6, 4
    asked = torch.zeros(B, K, dtype=torch.bool)
    asked[0, [1, 4]] = True
    asked[1, 0] = True
    asked[2, [0, 2, 5]] = True
    # attention concentrated on the asked boxes (any spread over those boxes and the words): mass 1
    logits = torch.randn(B, G, K, T, generator=g, dtype=torch.float64)
    logits = logits.masked_fill(~asked[:, None, :, None], float("-inf"))
    att = torch.softmax(logits.reshape(B, G, K * T), 2).view(B, G, K, T)
    torch.testing.assert_close(attention_mass(att, asked), torch.ones(B, G, dtype=torch.float64), rtol=0, atol=1e-12)
    # uniform over boxes and words: the share of asked boxes; nothing on the asked boxes: 0
    uniform = torch.full((B, G, K, T), 1.0 / (K * T), dtype=torch.float64)
    torch.testing.assert_close(attention_mass(uniform, asked), (asked.sum(1, keepdim=True).double() / K).expand(B, G),
                               rtol=0, atol=1e-12)
    elsewhere = torch.softmax(torch.randn(B, G, K, T, generator=g, dtype=torch.float64)
                              .masked_fill(asked[:, None, :, None], float("-inf")).reshape(B, G, K * T), 2)
    torch.testing.assert_close(attention_mass(elsewhere.view(B, G, K, T), asked),
                               torch.zeros(B, G, dtype=torch.float64), rtol=0, atol=0)
    with pytest.raises(ValueError, match="target"):
        attention_mass(att, asked.float())


# ------------------------------------------------------------------------------------- trained runs
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    base = tmp_path_factory.mktemp("bandiag")
    root = synth.generate(base / "data", images=6, val_images=2, questions=3, seed=1, v_dim=32, fixed=False)
    out = base / "cmp"
    assert main(["compare", "--data-root", str(root), "--out", str(out), *FLAGS, "--seeds", "0", "1",
                 "--variants", "off", "po-u"]) == 0
    return root, out


def _val_families(root):
    meta = json.loads((root / "synth_meta.json").read_text(encoding="utf-8"))
    qs = json.loads((root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text(encoding="utf-8"))["questions"]
    return {meta["question_type"][str(q["question_id"])] for q in qs}, len(qs)


def test_diagnose_run_ranges_and_families(sweep):
    root, out = sweep
    families, n_val = _val_families(root)
    for variant in ("off", "po-u"):
        res = diagnose_run(out / "runs" / f"{variant}-s0")
        assert res["variant"] == variant and res["glimpses"] == 2 and res["n_questions"] == n_val
        assert set(res["families"]) == families | {"all"}
        assert res["families"]["all"]["n"] == n_val
        for fam, f in res["families"].items():
            att = f["attention"]
            assert len(att["mass_per_glimpse"]) == 2
            for m in [att["mass"], att["chance"], *att["mass_per_glimpse"]]:
                assert m is None or 0.0 <= m <= 1.0, (fam, m)
            for key in ("spearman_x", "spearman_area"):
                r = f["input_order"][key]
                assert r["mean"] is None or -1.0 <= r["mean"] <= 1.0 and 0.0 <= r["abs_mean"] <= 1.0
            perm = f["permutation"]
            if variant == "off":
                assert perm is None
                continue
            for key in ("spearman_x", "spearman_area", "spearman_x_asked", "spearman_area_asked"):
                r = perm[key]
                assert len(r["abs_mean_per_glimpse"]) == 2
                if r["n_sets"]:
                    assert -1.0 <= r["mean"] <= 1.0 and abs(r["mean"]) <= r["abs_mean"] <= 1.0
            ent = perm["entropy"]
            assert ent["n_sets"] == 2 * f["n"]
            assert ent["mean"] >= 0.0 and 0.0 <= ent["relative"] <= 1.0 + 1e-9
            assert ent["mean"] <= math.log(24) + 1e-9          # at most log n of the largest image (max_boxes)
        assert res["families"]["all"]["attention"]["n"] > 0
        eta = res["eta"]
        if variant == "off":
            assert eta["checkpoint"] == {} and eta["history"] == {}
        else:
            assert set(eta["checkpoint"]) == {"eta/set_encoder.po"}
            assert eta["checkpoint"]["eta/set_encoder.po"] > 0
            assert len(eta["history"]["eta/set_encoder.po"]) == len(eta["epochs"]) == 1
    json.dumps(res, allow_nan=False)                           # JSON-able, no NaN


def test_padding_of_the_batch_does_not_change_the_numbers_and_max_questions(sweep):
    _, out = sweep
    run = out / "runs" / "po-u-s0"
    full = diagnose_run(run)
    again = diagnose_run(run, batch_size=1)
    a, b = full["families"]["all"], again["families"]["all"]
    assert a["attention"]["mass"] == pytest.approx(b["attention"]["mass"], rel=1e-5)
    assert a["permutation"]["entropy"]["mean"] == pytest.approx(b["permutation"]["entropy"]["mean"], rel=1e-4)
    part = diagnose_run(run, max_questions=3)
    assert part["n_questions"] == 3 and part["families"]["all"]["n"] == 3


def test_cli_writes_and_refuses_to_overwrite(sweep, capsys):
    _, out = sweep
    run = out / "runs" / "po-u-s1"
    assert main(["diagnose", "--run", str(run), "--max-questions", "2"]) == 0
    written = run / "diagnose_val.json"
    first = json.loads(written.read_text(encoding="utf-8"))
    assert first["n_questions"] == 2 and "| all |" in capsys.readouterr().out
    before = written.read_bytes()
    with pytest.raises(RunError, match="--overwrite"):
        main(["diagnose", "--run", str(run)])
    assert written.read_bytes() == before
    assert main(["diagnose", "--run", str(run), "--overwrite"]) == 0
    assert json.loads(written.read_text(encoding="utf-8"))["n_questions"] > 2


def test_sweep_report_per_variant_and_refusal(sweep, tmp_path):
    root, out = sweep
    # a copy of the sweep with one unfinished run: it is skipped and named
    copy = tmp_path / "cmp"
    shutil.copytree(out / "runs", copy / "runs")
    unfinished = copy / "runs" / "po-u-s7"
    shutil.copytree(copy / "runs" / "po-u-s0", unfinished)
    summary = json.loads((unfinished / "summary.json").read_text(encoding="utf-8"))
    (unfinished / "summary.json").write_text(json.dumps({**summary, "finished": False}), encoding="utf-8")
    res = diagnose_sweep(copy, max_questions=4)
    assert res["variants"] == ["off", "po-u"] and res["seeds"] == {"off": [0, 1], "po-u": [0, 1]}
    assert res["skipped"] == ["po-u-s7"]
    assert "all" in res["families"]
    s = res["summary"]["all"]
    assert s["off"]["mass"]["n"] == 2 and 0.0 <= s["off"]["mass"]["mean"] <= 1.0
    assert "abs_spearman_x" not in s["off"] and 0.0 <= s["po-u"]["abs_spearman_x"]["mean"] <= 1.0
    assert {"mass_g0", "mass_g1", "entropy", "entropy_relative", "abs_spearman_area"} <= set(s["po-u"])
    assert res["eta"]["off"] == {} and res["eta"]["po-u"]["eta/set_encoder.po"]["n"] == 2
    assert res["tests"]["all"]["mass: off vs po-u"]["n"] == 2
    assert "abs rho x: po-u vs input order" in res["tests"]["all"]
    json.dumps(res, allow_nan=False)
    written = json.loads((copy / "results" / "diagnose.json").read_text(encoding="utf-8"))
    assert written["summary"] == json.loads(json.dumps(res["summary"]))
    md = (copy / "results" / "diagnose.md").read_text(encoding="utf-8")
    # every row of each table has as many cells as its header (no stray pipes inside cells)
    tables = [block.splitlines() for block in md.split("\n\n") if block.startswith("|")]
    assert len(tables) >= 4 and all(len({line.count("|") for line in t}) == 1 for t in tables)
    assert "| all |" in md and "BAN + PO-U" in md and "po-u-s7" in md
    with pytest.raises(RunError, match="--overwrite"):
        main(["diagnose", "--sweep", str(copy)])
    assert main(["diagnose", "--sweep", str(copy), "--overwrite", "--max-questions", "2"]) == 0


def test_sweep_reuses_a_runs_own_diagnosis_of_the_same_checkpoint(sweep, tmp_path):
    import shutil

    _, out = sweep
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    for p in copy.rglob("diagnose*.json"):
        p.unlink()
    run = copy / "runs" / "po-u-s0"
    assert main(["diagnose", "--run", str(run)]) == 0
    own = json.loads((run / "diagnose_val.json").read_text(encoding="utf-8"))
    own["eta"]["checkpoint"] = {"marker": 123.0}           # recognisable if reused
    (run / "diagnose_val.json").write_text(json.dumps(own), encoding="utf-8")
    logs = []
    res = diagnose_sweep(copy, log=logs.append)
    assert res["runs"]["po-u-s0"]["eta"]["checkpoint"] == {"marker": 123.0}
    assert any("same checkpoint" in line for line in logs)
    # a newer checkpoint (or other settings) makes it diagnose the run again
    res = diagnose_sweep(copy, log=logs.append, max_questions=3, out=tmp_path / "d.json")
    assert res["runs"]["po-u-s0"]["eta"]["checkpoint"] != {"marker": 123.0}
    own["definitions"] = {"attention_mass": "older statistics"}
    (run / "diagnose_val.json").write_text(json.dumps(own), encoding="utf-8")
    res = diagnose_sweep(copy, out=tmp_path / "e.json")
    assert res["runs"]["po-u-s0"]["eta"]["checkpoint"] != {"marker": 123.0}
