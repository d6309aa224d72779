"""benchmarks/: the reference implementation equals setperm, and every benchmark runs on a tiny
configuration (no timing assertions)."""
import itertools
import json

import pytest
import torch
from torch.testing import assert_close

from benchmarks import internals, layer, limit, scaling
from benchmarks.harness import Config, build, call, naming_no_compiled, probe_memory, tiny_configs
from benchmarks.reference import (plain_sinkhorn, reference_from_setperm, reference_gradient,
                                  reference_lattice_gradient)
import setperm.pairwise as pairwise_mod
from integrations.common import run_command
from setperm import PermutationOptimization, PermutationSetEncoder
from setperm.functional import permutation_cost_gradient, sinkhorn


@pytest.mark.parametrize("cfg", tiny_configs(), ids=lambda c: c.name)
@pytest.mark.parametrize("layout", ["linear", "conv1d"])
def test_reference_matches_setperm_outputs_and_input_gradients(cfg, layout):
    outs, grads = [], []
    for impl in ("setperm", "reference"):
        mod, x, w = build(cfg, impl, seed=3, dtype=torch.float64, layout=layout)
        x = x.requires_grad_(True)
        out = call(mod, x, w)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append(x.grad)
    assert_close(outs[1], outs[0], rtol=0, atol=1e-10)
    assert_close(grads[1], grads[0], rtol=1e-8, atol=1e-10)


def test_reference_matches_setperm_float32_vqa_shape():
    cfg = Config("vqa-ish", "encoder", 13, 16, 3, 12, 4, lstm_hidden=8)
    (a, x, w), (b, _, _) = build(cfg, "setperm", seed=1), build(cfg, "reference", seed=1)
    with torch.no_grad():
        assert_close(call(b, x, w), call(a, x, w), rtol=0, atol=1e-5)


def test_reference_pieces_match_the_core():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 6, 6, generator=g, dtype=torch.float64)
    assert_close(plain_sinkhorn(z, iters=4), sinkhorn(z, iters=4), rtol=0, atol=1e-12)
    P = torch.softmax(torch.randn(3, 6, 6, generator=g, dtype=torch.float64), -1)
    C = torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64)
    C = C - C.transpose(-1, -2)
    assert_close(reference_gradient(P, C[:, 0]), permutation_cost_gradient(C[:, 0], P), rtol=0, atol=1e-12)
    assert_close(reference_lattice_gradient(P, C, (2, 3)), permutation_cost_gradient(C, P, grid=(2, 3)),
                 rtol=0, atol=1e-12)


def test_reference_from_setperm_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError, match="PO-U"):
        reference_from_setperm(PermutationSetEncoder(3, 4, None))
    with pytest.raises(ValueError, match="module must be"):
        reference_from_setperm(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="steps"):
        reference_from_setperm(PermutationOptimization(3, cost_hidden=4, steps=0, permutation="po-la", num_positions=4))


@pytest.mark.slow      # each probe is a fresh Python process that imports torch
@pytest.mark.parametrize("impl", ["reference", "setperm-compiled"])
def test_memory_probe_runs_in_a_fresh_process(impl, request):
    if impl == "setperm-compiled":
        request.getfixturevalue("inductor_builds_on_cpu")
    cfg = Config("probe", "optimizer", 1, 4, 2, 64, 8)
    peak = probe_memory(cfg, impl, "fb", threads=1)
    assert peak is not None and peak >= 0
    # the call's output P (B, N, N) and its gradient live in memory during the measured call: a probe
    # that measured nothing (a baseline taken after the call, a lost allocation) reads less
    assert peak >= 2 * cfg.batch * cfg.n * cfg.n * 4


@pytest.mark.usefixtures("inductor_builds_on_cpu")
def test_layer_benchmark_tiny(tmp_path, capsys):
    assert layer.main(["--tiny", "--no-memory", "--repeats", "1", "--warmup", "0", "--threads", "1",
                       "--conv1d-on", "tiny vqa", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "layer_tiny.json").read_text(encoding="utf-8"))
    impls = [r["impl"] for r in data["rows"]]
    assert impls.count("setperm (chunked)") == 3 and impls.count("setperm (compiled)") == 3
    assert "reference (Conv1d)" in impls
    assert all(r["max_abs_diff"] <= 1e-4 for r in data["rows"] if r["impl"] != "setperm (chunked)")
    # ratios live on the setperm rows and are computed from the rows' own times
    for ours in (r for r in data["rows"] if r["impl"].startswith("setperm")):
        ref = next(r for r in data["rows"] if r["config"] == ours["config"] and r["impl"] == "reference (nn.Linear)")
        assert ours["speedup_fb"] == pytest.approx(ref["fb_ms"] / ours["fb_ms"])
    printed = capsys.readouterr().out
    assert "| tiny sort | setperm (chunked) |" in printed
    # the columns of the committed tables: the one-core-busy ones only with --busy-core
    head = next(line for line in printed.splitlines() if line.startswith("| configuration |"))
    assert head == data["table"].splitlines()[0] and "one core busy" not in head
    assert head.endswith("| max abs diff to setperm (chunked) | note |")


@pytest.mark.parametrize("bench", [layer, scaling, limit, internals], ids=lambda m: m.__name__.split(".")[-1])
def test_a_compiled_kernel_that_cannot_be_built_is_one_line_naming_no_compiled(bench, tmp_path, monkeypatch,
                                                                              capsys, build_failure):
    def broken(*args):
        raise build_failure("C++ compile error")

    monkeypatch.setattr(pairwise_mod, "_compiled", lambda fn: broken)
    argv = ["--tiny", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]
    argv += [] if bench is limit else ["--warmup", "0"]
    argv += ["--no-memory"] if bench in (layer, scaling) else []
    assert run_command(naming_no_compiled(bench.main), "prog", argv) == 1
    err = capsys.readouterr().err            # (progress lines, then the error in one line)
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("prog: error: kernel='compiled' could not be compiled")
    assert "Cause: RuntimeError: C++ compile error" in last and last.endswith("(--no-compiled measures without it)")


@pytest.mark.usefixtures("inductor_builds_on_cpu")
def test_scaling_benchmark_tiny(tmp_path):
    assert scaling.main(["--tiny", "--no-memory", "--repeats", "1", "--warmup", "0", "--threads", "1",
                         "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "scaling_tiny.json").read_text(encoding="utf-8"))
    assert {r["N"] for r in data["n_rows"]} == {4, 8, 16}
    assert data["exponents"]["setperm_time_N"] is not None
    assert data["exponents"]["setperm-compiled_time_N"] is not None
    for s in data["shares"]:
        assert s["cost_share"] + s["optimise_share"] + s["lstm_share"] == pytest.approx(1.0)
    assert (tmp_path / "scaling_tiny.png").stat().st_size > 0


@pytest.mark.usefixtures("inductor_builds_on_cpu")
def test_limit_benchmark_tiny(tmp_path):
    assert limit.main(["--tiny", "--repeats", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "limit_tiny.json").read_text(encoding="utf-8"))
    assert data["ceilings"]["gemm_gflops"] > 0
    assert all(r["fraction"] > 0 for r in data["rows"])
    assert {r["impl"] for r in data["rows"]} == {"setperm", "setperm-compiled"}


def test_fit_exponent_recovers_a_power_law():
    xs = [10, 20, 40, 80]
    assert scaling.fit_exponent(xs, [3 * x ** 2.5 for x in xs], 10) == pytest.approx(2.5)
    assert scaling.fit_exponent(xs, [None, None, 1.0, None], 10) is None


@pytest.mark.usefixtures("inductor_builds_on_cpu")
def test_internals_benchmark_tiny(tmp_path):
    assert internals.main(["--tiny", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "internals_tiny.json").read_text(encoding="utf-8"))
    assert data["sinkhorn"]["scaling_fb_ms"] > 0 and data["sinkhorn"]["log_domain_fb_ms"] > 0
    assert set(data["system_time_share"]) == {"setperm", "setperm-compiled"}
    assert all(len(v) == 4 and all(t > 0 for t in v) for v in data["compile_s"].values())


def test_internals_readout_grid_tiny(tmp_path):
    argv = ["--readout", "--tiny", "--repeats", "1", "--threads", "1", "--readout-conditions", "1,2",
            "--out", str(tmp_path)]
    assert internals.main(argv) == 0
    data = json.loads((tmp_path / "internals_readout_tiny.json").read_text(encoding="utf-8"))
    rows = data["readout"]
    # full, uniform and BAN's sizes (10..12) at N = 12, under each condition
    assert [(r["condition"], r["sizes"]) for r in rows] == [(c, s) for c in "12" for s in ("full", "uniform", "ban")]
    assert all(r[f"{m}_ms"] > 0 for r in rows for m in internals.READOUT_METHODS)
    assert all(r["auto"] in internals.READOUT_METHODS and r["auto_over_best"] >= 1 for r in rows)
    assert rows[0]["distinct"] == 1 and rows[0]["grouped_steps"] == 12 and rows[0]["real_steps"] == 3 * 12
    assert [s["condition"] for s in data["readout_summary"]] == ["1", "2"]


def test_the_read_cost_fit_recovers_the_constants_that_made_the_times():
    """fit_read_costs on times made by the cost model itself (from other constants than the
    library's) gives those constants back: the fit and setperm.encoder.read_cost_model agree on
    which constant is which."""
    from setperm.encoder import READ_COSTS_NS, read_cost_model

    truth = {"call": 400e3, "step": 6.0e3, "row": 0.3, "packed_step": 120e3, "zero": 1.4}
    assert set(truth) == set(READ_COSTS_NS)
    rows = []
    for h, b, n, k, share in itertools.product((16, 128), (8, 256), (10, 100), (1, 9), (0.5, 1.0)):
        k = min(k, n)
        row = {"hidden": h, "features": 13, "batch": b, "n": n, "distinct": k,
               "grouped_steps": k * n - k * (k - 1) // 2, "real_steps": int(share * b * n)}
        times = read_cost_model(truth, h, 13, b, n, k, row["grouped_steps"], row["real_steps"], 1)
        rows.append({**row, **{f"{m}_ms": t / 1e6 for m, t in times.items()}})
    fit = internals.fit_read_costs(rows, threads=1)
    for name, value in truth.items():
        assert fit[name] == pytest.approx(value, rel=1e-3), name
    assert fit["median_abs_log_error"] < 1e-6


def test_internals_fallback_count_on_a_trained_sorting_run(tmp_path):
    from integrations.sorting.cli import main as sorting_main

    assert sorting_main(["train", "-N", "5", "--train-sets", "64", "--batch-size", "32", "--threads", "1",
                         "--out", str(tmp_path / "runs" / "po-u-n5")]) == 0
    rows = internals.fallback_counts(tmp_path / "runs", sets=2)
    assert [r["run"] for r in rows] == ["po-u-n5"]
    assert rows[0]["fast"] + rows[0]["log"] == 3 * (6 + 1)     # T = 6 steps + 1 per interval


@pytest.mark.parametrize("content", ["missing", "empty", "untrained"])
def test_internals_refuses_a_sorting_runs_folder_without_trained_runs(content, tmp_path, capsys):
    runs = tmp_path / "runs"
    if content != "missing":
        runs.mkdir()
    if content == "untrained":              # a run folder with its config but no checkpoint
        (runs / "po-u-n5").mkdir()
        (runs / "po-u-n5" / "config.json").write_text('{"permutation": "po-u", "set_size": 5}', encoding="utf-8")
    argv = ["--tiny", "--repeats", "1", "--threads", "1", "--no-compiled", "--out", str(tmp_path / "out"),
            "--sorting-runs", str(runs)]
    assert run_command(internals.main, "prog", argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"prog: error: --sorting-runs {runs}")
    assert not (tmp_path / "out").exists()          # refused before anything is measured or written


def test_the_readme_s_threads_table_names_the_machine_and_commands_of_its_result_files():
    """The top-level README's "Threads" table is copied from ``benchmarks/results/busy_core_threads{1,2}``:
    it names the CPU those files record (not the machine of the figures before it) and the
    commands that wrote them, ``--out`` included (without it the second run would refuse to replace
    the first one's ``runs/benchmarks/layer.json``)."""
    from pathlib import Path

    repo = Path(layer.__file__).resolve().parents[1]
    readme = " ".join((repo / "README.md").read_text(encoding="utf-8").split())
    threads = readme[readme.index("**Threads.**"):readme.index("**Speed and memory on a GPU")]
    for n in (1, 2):
        data = json.loads((repo / "benchmarks" / "results" / f"busy_core_threads{n}" / "layer.json").read_text(
            encoding="utf-8"))
        assert data["machine"]["cpu_model"] in threads
        assert data["args"]["busy_core"] == "True" and data["args"]["threads"] == str(n)
        assert f"--out {data['args']['out']}" in threads
