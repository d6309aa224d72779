"""benchmarks/gpu.py: without CUDA it refuses in one line; on the CPU (--device cpu --tiny) every path
runs and writes its JSON and table; the released module is imported from a checkout's folder and
leaves nothing behind in sys.modules (a stand-in checkout here, conftest's: the real one is the user's)."""
import json
import sys
import time
import warnings

import pytest
import torch

from benchmarks import gpu
from setperm import fused

FAST = ["--device", "cpu", "--tiny", "--repeats", "1", "--warmup", "1", "--ban-steps", "1", "--ban-batches", "1",
        "--compile-modes", ""]

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_exits_1_with_one_line(capsys, tmp_path):
    assert gpu.main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CUDA is required" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.usefixtures("inductor_builds_on_cpu")
def test_cpu_dry_run_writes_every_row(tmp_path, released_stand_in):
    root = released_stand_in
    before = set(sys.modules)
    assert gpu.main([*FAST, "--kernels", "auto,chunked", "--amp", "--perm-optim-root", str(root),
                     "--released-features", "6", "--out", str(tmp_path / "out")]) == 0
    assert not {"permnet", "permutation"} & (set(sys.modules) - before)
    data = json.loads((tmp_path / "out" / "gpu_tiny.json").read_text(encoding="utf-8"))
    impls = {r["impl"] for r in data["layer"]}
    assert impls == {"setperm (auto)", "setperm (chunked)", "reference", "released PermNet"}
    for row in data["layer"]:
        assert "note" not in row, row
        assert row["fwd_ms"] > 0 and row["fb_ms"] > 0
        assert row["fb_mib"] is None and "fb_host_ms" not in row   # peak memory and host time: on CUDA only
    fused_runs = fused.applies(torch.zeros(1, 4, 4), 3)            # the CPU runs them in the interpreter only
    for row in data["optimizer"]:
        if row["impl"].startswith("fused") and not fused_runs:
            assert "do not run on cpu" in row["note"]
        else:
            assert row["fb_ms"] > 0 and "failed" not in row.get("note", ""), row
    one = "fused, every set in a 16 tile"                    # tiles of 16: 2 warps by default
    assert [r["impl"] for r in data["optimizer"][:6]] == ["unrolled", "fused, a tile per set", f"{one}, 1 warp",
                                                          f"{one}, 2 warps", f"{one}, 4 warps",
                                                          f"{one}, 2 warps, C read in place (stage_c=False)"]
    if fused_runs:
        assert data["optimizer"][1]["note"] == "kernel='fused' default"
    assert [r["impl"].split(",")[0] for r in data["readout"]][:5] == ["packed", "packed", "padded", "fused (Triton)",
                                                                     "the LSTM alone on all N steps (no sizes: the floor)"]
    assert all(r["fb_ms"] > 0 and "note" not in r for r in data["readout"]), data["readout"]
    models = [r["model"] for r in data["ban"]]
    assert models == ["BAN", "BAN + LSTM", "BAN + LSTM, read fused", "BAN + PO-U, unrolled steps",
                      "BAN + PO-U, kernel fused", "BAN + PO-U, kernel fused, box counts on the device (padded LSTM read)",
                      "BAN + PO-U, kernel fused, read fused",
                      "BAN + PO-U, unrolled steps, bf16 autocast", "BAN + PO-U, kernel fused, bf16 autocast"]
    assert data["ban"][0]["ratio"] == 1 and all(r["step_ms"] > 0 for r in data["ban"])
    table = (tmp_path / "out" / "gpu_tiny.md").read_text(encoding="utf-8")
    assert "released PermNet" in table and "BAN + PO-U" in table and "LSTM readout" in table
    # the released module's ban-vqa copy runs T (3) Sinkhorn iterations, not L = 4: the caption says so
    assert "Sinkhorn iterations per call: setperm and the reference 4" in table and "released PermNet 3" in table
    assert data["fallbacks"] == [] and "Fallbacks" not in table


def test_a_kernel_that_fell_back_is_named_with_the_results(tmp_path, monkeypatch):
    monkeypatch.setattr(fused, "unavailable", lambda: "Triton is not installed")
    monkeypatch.setattr(fused, "applies", lambda C, steps: True)
    monkeypatch.setattr(fused, "_warned", set())
    with warnings.catch_warnings():
        # the suite makes a fused fallback an error; only that filter is lifted here (the others,
        # e.g. for torch's own deprecations that a first torch.compile import raises, still hold)
        warnings.filterwarnings("default", message="setperm kernel='fused'", category=RuntimeWarning)
        assert gpu.main([*FAST, "--kernels", "fused", "--no-optimizer", "--no-ban", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_tiny.json").read_text(encoding="utf-8"))
    # named once (a torch that cannot compile on this Python adds the compiled pairwise kernel's own)
    assert sum("Triton is not installed" in f for f in data["fallbacks"]) == 1
    assert "Fallbacks during the run" in (tmp_path / "gpu_tiny.md").read_text(encoding="utf-8")


def test_bad_perm_optim_root_is_one_line(capsys, tmp_path):
    assert gpu.main([*FAST, "--no-ban", "--perm-optim-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a checkout of github Cyanogenoid/perm-optim" in err
    with pytest.raises(ValueError, match="empty"):
        gpu.load_released_permnet("")


def test_bad_kernels_flag():
    with pytest.raises(SystemExit):
        gpu.main([*FAST, "--kernels", "chunked,fast"])


@pytest.mark.skipif(torch.__version__ < "2.3", reason="torch 2.1's inductor fails on the unrolled steps with an "
                    "internal assertion (2.3 and newer compile them)")
@pytest.mark.usefixtures("inductor_builds_on_cpu")
def test_the_whole_encoder_compiled_is_timed_with_its_first_call(tmp_path):
    assert gpu.main([*FAST, "--no-layer", "--no-optimizer", "--no-ban", "--compile-modes", "reduce-overhead",
                     "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_tiny.json").read_text(encoding="utf-8"))
    assert [row["kernel"] for row in data["compile"]] == ["compiled", "fused"]
    for row in data["compile"]:
        assert row["impl"] == "torch.compile(encoder, mode='reduce-overhead')" and "note" not in row, row
        assert row["first_call_s"] > 0 and row["fb_ms"] > 0
    assert "under torch.compile" in (tmp_path / "gpu_tiny.md").read_text(encoding="utf-8")
    with pytest.raises(SystemExit):
        gpu.main([*FAST, "--compile-modes", "fastest"])
    with pytest.raises(SystemExit):
        gpu.main([*FAST, "--compile-kernels", "auto,fastest"])


def test_a_run_stopped_part_way_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    def stopped(*args):
        yield {"config": "B=3 N=6", "impl": "unrolled", "fb_ms": 1.5}
        raise KeyboardInterrupt                          # stopped while timing the second row
    monkeypatch.setattr(gpu, "optimizer_rows", stopped)
    with pytest.raises(KeyboardInterrupt):
        gpu.main([*FAST, "--kernels", "chunked", "--no-ban", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "gpu_tiny.json").read_text(encoding="utf-8"))
    assert {r["impl"] for r in data["layer"]} == {"setperm (chunked)", "reference"}
    assert data["optimizer"] == [{"config": "B=3 N=6", "impl": "unrolled", "fb_ms": 1.5}] and data["readout"] == []
    table = (tmp_path / "gpu_tiny.md").read_text(encoding="utf-8")
    assert "Layer" in table and "| B=3 N=6 | unrolled | 1.5" in table


def test_a_slow_call_is_timed_within_the_budget():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.02)                                 # each call alone exceeds the budget
    assert gpu.time_call(slow, 5, 20, torch.device("cpu"), budget_s=0.01) >= 0.02
    assert len(calls) == 1 + 3                           # one warm-up call, three timed ones
    calls.clear()
    gpu.time_call(slow, 2, 4, torch.device("cpu"))       # no budget: every call
    assert len(calls) == 6


def test_a_failing_ban_model_keeps_the_other_models_rows_and_the_tables_after_it(tmp_path, monkeypatch):
    from integrations.ban import train as ban_train

    real = ban_train.train_step

    def train_step(model, *args, amp=False, **kwargs):
        if amp:
            raise RuntimeError("CUDA out of memory.\nsecond line")
        return real(model, *args, amp=amp, **kwargs)
    monkeypatch.setattr(ban_train, "train_step", train_step)
    assert gpu.main([*FAST, "--no-layer", "--no-optimizer", "--amp", "--compile-modes", "default",
                     "--compile-kernels", "chunked", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_tiny.json").read_text(encoding="utf-8"))
    rows = {r["model"]: r for r in data["ban"]}
    assert len(rows) == 9 and rows["BAN"]["ratio"] == 1
    for label, row in rows.items():
        if "autocast" in label:
            assert row["note"] == "failed: RuntimeError: CUDA out of memory." and "step_ms" not in row, row
        else:
            assert row["step_ms"] > 0 and row["steps"] == 1 and "note" not in row, row
    assert len(data["compile"]) == 1                     # the table after it still ran


def test_the_compiled_encoder_s_gradients_are_set_not_added_at_every_call(tmp_path, monkeypatch):
    """Each timed call of the torch.compile table starts without gradients: under CUDA graphs
    (mode="reduce-overhead") adding to the previous replay's gradients, which the next replay
    overwrites, fails. (torch.compile is left out here: the CPU has no CUDA graphs.)"""
    built = []
    real = gpu._setperm

    def setperm(*args):
        built.append(real(*args))
        return built[-1]
    monkeypatch.setattr(gpu, "_setperm", setperm)
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: module)
    assert gpu.main([*FAST, "--no-layer", "--no-optimizer", "--no-ban", "--no-readout", "--compile-modes", "default",
                     "--compile-kernels", "chunked", "--repeats", "3", "--out", str(tmp_path)]) == 0
    (mod, (x, w)), = built
    got = [p.grad.clone() for p in mod.parameters()]
    mod.zero_grad(set_to_none=True)
    gpu.call(mod, x.detach().requires_grad_(True), w).sum().backward()
    for g, one in zip(got, (p.grad for p in mod.parameters())):
        torch.testing.assert_close(g, one)


def test_the_graphed_layer_records_the_encoder_with_positional_inputs_and_trains_it_as_eager(monkeypatch):
    """graphed_fb hands make_graphed_callables the encoder as a module of positional arguments and a
    sample input that requires a gradient, and each call gives the gradients of the eager call. (On
    the CPU, without CUDA graphs, the recording is stood in by the module itself.)"""
    recorded = []

    def record(module, sample_args, num_warmup_iters, allow_unused_input=False):
        recorded.append((module, sample_args, num_warmup_iters))
        return module
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", record)
    cfg = gpu.layer_configs(tiny=True)[0]
    mod, (x, w) = gpu._setperm(cfg, "chunked", torch.device("cpu"))
    fb = gpu.graphed_fb(mod, (x, w), warmup=2)
    (module, (sx, sw), warmup), = recorded
    assert isinstance(module, torch.nn.Module) and module.encoder is mod and warmup == 2
    assert sx.requires_grad and not sw.requires_grad and torch.equal(sx, x) and sw is w
    fb()
    got = [p.grad.clone() for p in mod.parameters()]
    mod.zero_grad(set_to_none=True)
    gpu._run(mod, (x, w), "fb", released=False)
    for g, want in zip(got, (p.grad for p in mod.parameters())):
        torch.testing.assert_close(g, want)


@pytest.mark.parametrize("error", [RuntimeError("the kernel cannot run here"), torch.cuda.OutOfMemoryError("CUDA out")],
                         ids=["error", "out-of-memory"])
def test_a_failing_layer_row_keeps_the_other_rows_on_a_torch_without_torch_oom_error(tmp_path, monkeypatch, error):
    """torch 2.0 - 2.4 have no ``torch.OutOfMemoryError`` (only ``torch.cuda.OutOfMemoryError``): the
    row's failure is still caught there, instead of an AttributeError from the except clause ending the run."""
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)
    real = gpu._setperm

    def setperm(cfg, kernel, device, **kwargs):
        if kernel == "compiled":
            raise error
        return real(cfg, kernel, device, **kwargs)
    monkeypatch.setattr(gpu, "_setperm", setperm)
    assert gpu.main([*FAST, "--kernels", "chunked,compiled", "--no-optimizer", "--no-ban", "--no-readout",
                     "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_tiny.json").read_text(encoding="utf-8"))
    rows = {(r["config"], r["impl"]): r for r in data["layer"]}
    assert len(rows) == 2 * 3
    for (config, impl), row in rows.items():
        if impl == "setperm (compiled)":
            want = "out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else "failed: RuntimeError"
            assert row["note"].startswith(want) and "fb_ms" not in row, row
        else:
            assert row["fb_ms"] > 0 and "note" not in row, row


@pytest.mark.slow      # two runs of the script, each a few fresh Python processes
def test_gpu_check_prints_the_tables_of_its_own_run(tmp_path):
    """``bash benchmarks/gpu_check.sh OUT ... --tiny`` prints the tables it wrote (``gpu_tiny.md``),
    and a run that wrote none does not print an earlier run's ``gpu.md`` left in OUT as its own."""
    import os
    import subprocess
    from pathlib import Path

    repo = Path(gpu.__file__).resolve().parents[1]
    env = {**os.environ, "SETPERM_TESTS_TIMEOUT": "1"}          # the CUDA tests are not what is checked here
    out = tmp_path / "out"

    def run(*flags):
        res = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), str(out), *flags], cwd=repo,
                             env=env, capture_output=True, text=True, timeout=300)
        return res.stdout[res.stdout.index("== benchmarks.gpu"):res.stdout.index("== CUDA tests")]

    printed = run("--device", "cpu", "--tiny", "--no-layer", "--no-ban", "--no-optimizer", "--compile-modes", "")
    assert "The encoder's LSTM readout" in printed and "| sets | implementation |" in printed, printed
    (out / "gpu.md").write_text("an earlier run's table\n", encoding="utf-8")
    printed = run("--device", "cpu", "--kernels", "fastest")           # refused before anything is measured
    assert "an earlier run's table" not in printed and "no tables written by this run" in printed, printed


@pytest.mark.slow      # waits for the tests' time limit to pass
def test_gpu_check_keeps_the_failures_of_tests_stopped_at_their_time_limit(tmp_path):
    """The CUDA tests stopped after ``SETPERM_TESTS_TIMEOUT`` seconds still report the failures of the
    tests that ran, by name (pytest prints them only when it stops as after Ctrl-C: a SIGTERM kills it
    with nothing but its progress dots written). A stand-in ``python3`` on PATH runs a stand-in suite
    (one failing test, one that outlasts the limit) for ``-m pytest`` and skips the benchmark."""
    import os
    import stat
    import subprocess
    from pathlib import Path

    repo = Path(gpu.__file__).resolve().parents[1]
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_stand_in.py").write_text(
        "import time\n\ndef test_cuda_fails():\n    assert 1 == 2\n\n"
        "def test_cuda_outlasts_the_limit():\n    time.sleep(600)\n", encoding="utf-8")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1 $2" = "-m benchmarks.gpu" ]; then exit 0; fi\n'
        f'if [ "$1 $2" = "-m pytest" ]; then exec {sys.executable} -m pytest -q -rfEs -p no:cacheprovider {suite}; fi\n'
        f'exec {sys.executable} "$@"\n', encoding="utf-8")
    python3.chmod(python3.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SETPERM_TESTS_TIMEOUT": "20"}
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), str(out)], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    report = (out / "cuda_tests.txt").read_text(encoding="utf-8")
    assert "FAILED" in report and "test_cuda_fails" in report, report
    assert "1 failed" in report and "(stopped after 20 s)" in report, report
    assert "== CUDA tests (exit 124)" in res.stdout and "test_cuda_fails" in res.stdout, res.stdout
    assert res.returncode == 1


def test_the_device_counts_variant_calls_the_patched_ban_without_the_host_counts():
    """The BAN row "box counts on the device" times the padded LSTM read: the training loop's
    box counts (from the host) are dropped before the patched model, which then takes the sizes
    from its padding mask; the model inputs see the patched model inside, as under DDP."""
    from integrations.ban.model import build_ban
    from integrations.ban.plugin import patch_ban
    from integrations.ban.train import model_inputs

    torch.manual_seed(0)
    model = patch_ban(build_ban(50, 20, v_dim=32, num_hid=16, gamma=2), permutation="po-u").eval()
    wrapped = gpu._CountsOnDevice(model)
    batch = gpu.random_batches(gpu.ban_shape(True), 1)[0]
    inputs = model_inputs(wrapped, None, batch, torch.device("cpu"))
    assert inputs == {"box_counts": batch.mask.sum(1).tolist()}
    seen = []
    model.set_encoder.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs), with_kwargs=True)
    logits, _ = wrapped(batch.v, batch.b, batch.q, batch.target, **inputs)
    direct, _ = model(batch.v, batch.b, batch.q, batch.target, **inputs)
    assert len(seen) == 2 and "mask" in seen[0] and "lengths" not in seen[0]     # wrapped: the padding mask
    assert "lengths" in seen[1]                                                   # direct: the host's counts
    torch.testing.assert_close(logits, direct, rtol=1e-5, atol=1e-6)
