"""python -m integrations.ban compare: every (variant, seed) trained as its own run, a report with per-family
mean ± std and paired tests, and the sweep folder following the run rule."""
import json

import pytest

from integrations.ban.cli import main
from integrations.ban.research import synth
from integrations.common import RunError

FLAGS = ["--num-hid", "16", "--gamma", "2", "--batch-size", "4", "--workers", "0", "--threads", "1", "--epochs", "1",
         "--seeds", "0", "1", "--variants", "off", "po-u"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("bancmp") / "data", images=6, val_images=2, questions=3, seed=1,
                          v_dim=32, fixed=False)


def test_compare_trains_each_cell_and_reports(root, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--data-root", str(root), "--out", str(out), *FLAGS]) == 0
    results = json.loads((out / "results" / "compare.json").read_text(encoding="utf-8"))
    assert sorted(results["runs"]) == ["off-s0", "off-s1", "po-u-s0", "po-u-s1"]
    assert "all" in results["families"] and set(results["summary"]["all"]) == {"off", "po-u"}
    test = results["tests"]["all"]["off vs po-u"]
    assert test["n"] == 2 and test["p"] is not None
    # the PO-U runs record eta and the permutation entropy per epoch; plain BAN has neither
    curves = results["runs"]["po-u-s0"]["curves"]
    assert any(k.startswith("eta/") for k in curves) and any(k.startswith("permutation_entropy/") for k in curves)
    assert results["runs"]["off-s0"]["curves"] == {}
    md = (out / "results" / "compare.md").read_text(encoding="utf-8")
    assert "| all |" in md and "BAN + PO-U" in md and "p " in md
    assert "--resume" not in capsys.readouterr().out      # the runs of a new sweep simply start
    assert (out / "results" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a finished sweep with the same settings changes nothing; other settings are refused
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main(["compare", "--data-root", str(root), "--out", str(out), *FLAGS]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(RunError, match="--resume"):
        main(["compare", "--data-root", str(root), "--out", str(out), *FLAGS[:-2], "none"])


@pytest.mark.slow       # two worker processes
def test_parallel_runs_give_the_same_results_as_sequential_ones(root, tmp_path):
    """--jobs trains runs side by side in their own processes; each run is the same as when trained alone."""
    flags = [f for f in FLAGS]
    seq, par = tmp_path / "seq", tmp_path / "par"
    assert main(["compare", "--data-root", str(root), "--out", str(seq), *flags]) == 0
    assert main(["compare", "--data-root", str(root), "--out", str(par), "--jobs", "2", *flags]) == 0
    a = json.loads((seq / "results" / "compare.json").read_text(encoding="utf-8"))["runs"]
    b = json.loads((par / "results" / "compare.json").read_text(encoding="utf-8"))["runs"]
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name]["val"] == b[name]["val"] and a[name]["train_soft_acc"] == b[name]["train_soft_acc"], name
    # --jobs is not a setting of the sweep: the finished sweep is recognised with another value
    before = {p: p.stat().st_mtime_ns for p in par.rglob("*")}
    assert main(["compare", "--data-root", str(root), "--out", str(par), "--jobs", "1", *flags]) == 0
    assert {p: p.stat().st_mtime_ns for p in par.rglob("*")} == before


def test_resume_extends_a_finished_sweep_with_more_seeds(root, tmp_path):
    out = tmp_path / "ext"
    flags = FLAGS[:FLAGS.index("--seeds")] + ["--variants", "off"]
    assert main(["compare", "--data-root", str(root), "--out", str(out), *flags, "--seeds", "0"]) == 0
    first = (out / "runs" / "off-s0" / "summary.json").read_bytes()
    with pytest.raises(RunError, match="--resume"):
        main(["compare", "--data-root", str(root), "--out", str(out), *flags, "--seeds", "0", "1"])
    assert main(["compare", "--data-root", str(root), "--out", str(out), *flags, "--seeds", "0", "1", "--resume"]) == 0
    results = json.loads((out / "results" / "compare.json").read_text(encoding="utf-8"))
    assert sorted(results["runs"]) == ["off-s0", "off-s1"]
    assert (out / "runs" / "off-s0" / "summary.json").read_bytes() == first      # the finished run is reused


def test_ablation_variants_set_their_settings_and_extend_a_sweep(root, tmp_path):
    """po-u-geometry / po-u-oracle are ordinary runs with --order-by geometry / --oracle-relevance; a sweep
    recorded without them gains them by --resume and keeps its finished runs (whose configs lack the
    new settings) as they are."""
    import math

    from integrations.ban.research.diagnose import diagnose_run

    out = tmp_path / "abl"
    flags = FLAGS[:FLAGS.index("--seeds")] + ["--seeds", "0"]
    assert main(["compare", "--data-root", str(root), "--out", str(out), *flags, "--variants", "off"]) == 0
    first = (out / "runs" / "off-s0" / "summary.json").read_bytes()
    assert main(["compare", "--data-root", str(root), "--out", str(out), *flags, "--resume",
                 "--variants", "off", "po-u-geometry", "po-u-oracle", "po-u-geometry-st"]) == 0
    assert (out / "runs" / "off-s0" / "summary.json").read_bytes() == first
    config = lambda name: json.loads((out / "runs" / name / "config.json").read_text(encoding="utf-8"))
    assert "order_by" not in config("off-s0") and "oracle_relevance" not in config("off-s0")
    assert config("po-u-geometry-s0")["order_by"] == "geometry" and config("po-u-geometry-s0")["permutation"] == "po-u"
    assert config("po-u-oracle-s0")["oracle_relevance"] is True and "order_by" not in config("po-u-oracle-s0")
    st = config("po-u-geometry-st-s0")
    assert st["straight_through"] is True and st["order_by"] == "geometry" and "straight_through" not in config("off-s0")
    results = json.loads((out / "results" / "compare.json").read_text(encoding="utf-8"))
    assert sorted(results["runs"]) == ["off-s0", "po-u-geometry-s0", "po-u-geometry-st-s0", "po-u-oracle-s0"]
    assert "BAN + PO-U (oracle relevance)" in (out / "results" / "compare.md").read_text(encoding="utf-8")
    # the oracle run is trained and diagnosed with the ground truth: weight sigmoid(4) on the asked class's
    # boxes and sigmoid(-4) elsewhere (count_left's landmark is relevant too, so it is left out here)
    diag = diagnose_run(out / "runs" / "po-u-oracle-s0")
    for fam, f in diag["families"].items():
        if fam in ("all", "count_left") or f.get("relevance") is None:
            continue
        assert math.isclose(f["relevance"]["asked"], 1 / (1 + math.exp(-4)), rel_tol=1e-6), fam
        if f["relevance"]["other"] is not None:
            assert math.isclose(f["relevance"]["other"], 1 / (1 + math.exp(4)), rel_tol=1e-6), fam
    # and the plain PO-U model's relevance is BAN's attention, anything in (0, 1)
    geo = diagnose_run(out / "runs" / "po-u-geometry-s0")["families"]["all"]
    assert 0 < geo["relevance"]["asked"] < 1 and geo["permutation"] is not None


def test_oracle_relevance_needs_a_synthetic_dataset_and_a_set_encoder(root, tmp_path):
    import shutil

    from integrations.ban.cli import parse_args
    from integrations.ban.train import relevance_oracle

    with pytest.raises(SystemExit):
        parse_args(["--data-root", str(root), "--permutation", "off", "--oracle-relevance"])
    with pytest.raises(SystemExit):
        parse_args(["--data-root", str(root), "--permutation", "none", "--order-by", "geometry"])
    with pytest.raises(SystemExit):
        parse_args(["--data-root", str(root), "--permutation", "none", "--straight-through"])
    real = tmp_path / "real"
    shutil.copytree(root, real)
    (real / "synth_meta.json").unlink()
    args = parse_args(["--data-root", str(real), "--permutation", "po-u", "--oracle-relevance"])
    with pytest.raises(ValueError, match="--oracle-relevance: .* not a synthetic dataset"):
        relevance_oracle(args)


def _fails_with(exc):
    def train(cell_args):
        raise exc
    return train


def test_a_worker_reports_one_line_errors_as_one_line_and_defects_with_their_traceback():
    import errno

    from integrations.ban.research.compare import _train_cell
    from integrations.common import NonFiniteError

    status, text = _train_cell(_fails_with(NonFiniteError("the loss is nan at step 3")), None)
    assert (status, text) == ("error", "the loss is nan at step 3")
    disk = OSError(errno.ENOSPC, "No space left on device", "/runs/a/checkpoints/step_00000003.pt")
    try:
        raise RuntimeError("[enforce fail at inline_container.cc]") from disk
    except RuntimeError as wrapped:
        status, text = _train_cell(_fails_with(wrapped), None)
    assert (status, text) == ("error", "No space left on device: /runs/a/checkpoints/step_00000003.pt")
    status, text = _train_cell(_fails_with(ZeroDivisionError("a defect")), None)
    assert status == "failed" and "Traceback" in text and "ZeroDivisionError" in text


@pytest.mark.slow       # a sweep with two worker processes in a subprocess, signalled
def test_ctrl_c_stops_a_parallel_sweep_with_a_checkpoint_per_running_run(root, tmp_path):
    """Ctrl-C reaches the sweep's process group; the workers are in their own groups, so each running run
    gets the stop once, from the sweep: it writes a checkpoint (what --resume continues from) and the
    sweep exits with 130 and one line."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "cut"
    flags = FLAGS[:FLAGS.index("--epochs")] + ["--epochs", "400", "--seeds", "0", "--variants", "off", "po-u"]
    cmd = [sys.executable, "-m", "integrations.ban", "compare", "--data-root", str(root), "--out", str(out),
           "--jobs", "2", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=repo, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    t0 = time.monotonic()
    while len(list((out / "runs").glob("*/config.json"))) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < 300, "the runs did not start"
        time.sleep(0.05)
    time.sleep(3)                                   # both runs are training
    os.killpg(proc.pid, signal.SIGINT)
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "interrupted by SIGINT" in last and "--resume" in last and "Traceback" not in err, err
    for name in ("off-s0", "po-u-s0"):
        assert list((out / "runs" / name / "checkpoints").glob("step_*.pt")), (name, stdout)
        record = out / "runs" / name / "summary.json"       # written after every epoch; finished at the end
        assert not record.exists() or not json.loads(record.read_text(encoding="utf-8")).get("finished")
    assert "interrupted" in stdout


def test_pooled_order_families_are_the_per_run_mean_tested_by_seed():
    """The row "order families (pooled)": per run the mean of the five order families, then mean ± std and the
    paired test by seed like a family; recomputed from compare.json's per-run values alone."""
    from integrations.ban.research.compare import ORDER_FAMILIES, POOLED, markdown, tabulate
    from integrations.common.stats import paired_test

    accs = {"off": [0.30, 0.34, 0.33], "po-u": [0.38, 0.37, 0.41]}
    runs = {f"{v}-s{s}": {"variant": v, "seed": s, "val_n": 100,
                          "val": {"all": 0.5, "exists": 0.9, **{f: a + 0.01 * i for i, f in enumerate(ORDER_FAMILIES)}}}
            for v, per_seed in accs.items() for s, a in enumerate(per_seed)}
    res = tabulate(runs, ["off", "po-u"], [0, 1, 2])
    assert res["pooled"] == {POOLED: list(ORDER_FAMILIES)} and POOLED not in res["families"]
    pooled = {v: [a + 0.02 for a in per_seed] for v, per_seed in accs.items()}    # mean of a + 0.00 .. a + 0.04
    assert res["summary"][POOLED]["po-u"]["mean"] == pytest.approx(sum(pooled["po-u"]) / 3)
    expected = paired_test(pooled["off"], pooled["po-u"])
    got = res["tests"][POOLED]["off vs po-u"]
    assert got["diff_mean"] == pytest.approx(expected["diff_mean"]) and got["p"] == pytest.approx(expected["p"])
    assert f"| {POOLED} | {100 * expected['diff_mean']:+.1f} (p " in markdown(res)
    # without two order families (e.g. --families exists,colour) there is no pooled row
    no_order = {k: {**r, "val": {"all": 0.5, "exists": 0.9}} for k, r in runs.items()}
    plain = tabulate(no_order, ["off", "po-u"], [0, 1, 2])
    assert plain["pooled"] == {} and POOLED not in plain["summary"] and POOLED not in markdown(plain)


def _assert_close_tree(got, want, where="compare.json"):
    """Equal structure and values, floats to a relative 1e-9."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), where
        for key in want:
            _assert_close_tree(got[key], want[key], f"{where}[{key!r}]")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_close_tree(a, b, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12, nan_ok=True), where
    else:
        assert got == want, where


@pytest.mark.parametrize("results", ["results", "results/ablation"])
def test_the_committed_reports_are_what_tabulate_gives_from_their_runs(results):
    """integrations/ban/results*/compare.{json,md}, the README's figures (the pooled rows included), follow
    from the per-run accuracies they hold."""
    from pathlib import Path

    from integrations.ban.research.compare import POOLED, markdown, tabulate

    folder = Path(__file__).resolve().parents[2] / "integrations" / "ban" / results
    committed = json.loads((folder / "compare.json").read_text(encoding="utf-8"))
    again = json.loads(json.dumps(tabulate(committed["runs"], committed["variants"], committed["seeds"])))
    _assert_close_tree(again, committed)      # (t-tests and means round differently across NumPy / SciPy releases)
    assert (folder / "compare.md").read_text(encoding="utf-8") == markdown(committed) + "\n"
    if results == "results":         # the README: BAN + PO-U over BAN +4.5 (p 0.095), over BAN + LSTM +1.4 (p 0.40)
        t = committed["tests"][POOLED]
        assert round(-100 * t["off vs po-u"]["diff_mean"], 1) == 4.5 and round(t["off vs po-u"]["p"], 3) == 0.095
        assert round(-100 * t["none vs po-u"]["diff_mean"], 1) == 1.4 and round(t["none vs po-u"]["p"], 2) == 0.40


def test_the_sweeps_help_lists_no_max_steps(capsys):
    for command in ("compare", "knobs"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--max-steps" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--max-steps" in capsys.readouterr().out
