"""benchmarks/fused_resources.py compiles setperm.fused's kernels for sm_90 without a GPU and reads
their resources; it refuses in one line under Triton's interpreter. (A fresh process: this test
process runs Triton in its interpreter, see conftest.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import fused_resources
from integrations.common.lifecycle import RunError

REPO = Path(__file__).resolve().parents[2]
_WHY_NOT = fused_resources.unsupported()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))


def _run(out, *extra, interpret=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Triton keeps its cache under $TRITON_HOME (default: the home folder), which need not be writable
    env["TRITON_HOME"] = str(Path(out) / "triton-home")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "benchmarks.fused_resources", "--out", str(out), *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_compiles_both_kernels_and_reads_their_resources(tmp_path):
    r = _run(tmp_path, "--blocks", "16", "--warps", "1,2")
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "fused_resources.json").read_text(encoding="utf-8"))["rows"]
    assert [(row["warps"], row["kernel"]) for row in rows] == [
        (1, "forward_kernel"), (1, "backward_kernel"), (2, "forward_kernel"), (2, "backward_kernel")]
    for row in rows:
        assert "note" not in row, row
        assert 0 < row["registers"] <= 255 and row["stack"] >= 0 and row["shared"] >= 0
        # forward has one matrix product per step, backward two: at least one loop each, every
        # step at least its multiply-adds (one per tile entry of a thread)
        steps = [float(v) for v in row["product_loops"].split(", ")]
        assert len(steps) >= (1 if row["kernel"] == "forward_kernel" else 2), row
        assert all(v >= 16 * 16 / (32 * row["warps"]) for v in steps), row
        # each step reads an entry of each operand; the Sinkhorn rounds shuffle
        loads = [float(v) for v in row["product_loads"].split(", ")]
        assert len(loads) == len(steps) and all(v >= 1 for v in loads), row
        assert row["sinkhorn"] != "-", row
    assert [row["used"] for row in rows] == ["", "", "yes", "yes"]        # setperm.fused uses 2 warps at 16
    assert "| 16 | 1 | forward_kernel |" in (tmp_path / "fused_resources.md").read_text(encoding="utf-8")


def test_read_compiles_the_fused_lstm_read_kernels_in_every_precision(tmp_path):
    from setperm import fused_read

    r = _run(tmp_path, "--read", "--blocks", "16,128", "--warps", str(fused_read.WARPS))
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "fused_resources_read.json").read_text(encoding="utf-8"))["rows"]
    assert [(row["block"], row["precision"], row["kernel"]) for row in rows] == [
        (block, precision, kernel) for block in (16, 128) for precision in ("tf32", "ieee", "float64")
        for kernel in ("lstm_forward_kernel", "lstm_backward_kernel")]
    for row in rows:
        assert "note" not in row, row
        assert 0 < row["registers"] <= 255 and row["stack"] >= 0 and row["shared"] > 0
        assert row["used"] == "yes"                # both tiles, at the read's warps
    assert f"| 128 | {fused_read.WARPS} | lstm_forward_kernel | tf32 |" in (tmp_path / "fused_resources_read.md").read_text(encoding="utf-8")
    r = _run(tmp_path, "--read", "--c-in-place")
    assert r.returncode == 2 and "--c-in-place" in r.stderr


def test_compiles_the_kernels_with_the_alignment_a_launch_gives_their_pointers(tmp_path):
    """A launch tells Triton that every pointer (a tensor torch allocated) is 16-byte aligned, and
    the compiled code differs with that hint (registers, stack, shared memory): the kernels measured
    here carry it on every pointer argument, as the kernels a GPU runs do."""
    code = ("import triton\n"
            "from triton.backends.compiler import GPUTarget\n"
            "from benchmarks.fused_resources import _source\n"
            "from setperm import _fused_kernels as k\n"
            "for fn in (k.forward_kernel, k.backward_kernel):\n"
            "    ttir = triton.compile(_source(fn, 16), target=GPUTarget('cuda', 90, 32),\n"
            "                          options={'num_warps': 2}).asm['ttir']\n"
            "    header = ttir[ttir.index('tt.func'):].split('\\n', 1)[0]\n"
            "    pointers = [n for n in fn.arg_names if n.endswith('_ptr')]\n"
            "    print(fn.__name__, len(pointers), header.count('tt.divisibility = 16'))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_HOME"] = str(tmp_path / "triton-home")         # (as in _run: the home folder need not be writable)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for line in r.stdout.strip().splitlines():
        name, pointers, hinted = line.split()
        assert int(pointers) > 0 and hinted == pointers, r.stdout


def test_an_os_error_while_compiling_is_one_line_and_writes_nothing(monkeypatch, tmp_path, capsys):
    """A kernel that does not build is a row of the table; an OS error (Triton's cache under an
    unwritable home folder) is the machine's: the command ends in one line naming the path."""
    from integrations.common import run_command
    # the command imports the kernels; imported first without the interpreter, they would stay compiled
    # kernels in this process, for the tests after this one that run them in the interpreter
    from setperm import _fused_kernels  # noqa: F401

    def unwritable(*args):
        raise PermissionError(13, "Permission denied", "/home/user/.triton")

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(fused_resources, "resources", unwritable)
    main = fused_resources.main
    rc = run_command(lambda argv: main(["--blocks", "16", "--warps", "2", "--out", str(tmp_path)]), "prog")
    assert rc == 1
    assert capsys.readouterr().err == "prog: error: Permission denied: /home/user/.triton\n"
    assert not any(tmp_path.iterdir())


def test_refuses_under_the_interpreter_and_bad_flags(tmp_path):
    r = _run(tmp_path, "--blocks", "16", "--warps", "1", interpret=True)
    assert r.returncode == 1 and "TRITON_INTERPRET=1" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "fused_resources.json").exists()
    r = _run(tmp_path, "--blocks", "24")
    assert r.returncode == 2 and "--blocks" in r.stderr


def test_refuses_a_triton_the_kernels_do_not_support(monkeypatch, tmp_path):
    """The reason is setperm.fused's own (Triton 3.0 and 3.1 would crash this process compiling)."""
    from setperm import fused

    reason = "Triton 3.1.0 is installed; the kernels need Triton 3.2 or newer"
    monkeypatch.setattr(fused, "unavailable", lambda: reason)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)      # (refused first otherwise)
    with pytest.raises(RunError, match="Triton 3.1.0 is installed"):
        fused_resources.main(["--blocks", "16", "--warps", "1", "--out", str(tmp_path)])
    assert not (tmp_path / "fused_resources.json").exists()


def test_counts_the_product_loops_per_step_and_the_reduction_loops_per_round():
    """Machine code in cuobjdump's form: an outer loop around two inner ones, one a loop of
    loads and multiply-adds unrolled twice (4 multiply-adds at 2 per step), one a reduction
    (a shuffle: not a product loop); the count is per step of 2 tile entries per thread."""
    lines = ["/*0000*/ MOV R1, c[0x0][0x28] ;",
             "/*0010*/ LDG.E R2, desc[UR4][R8.64] ;",              # outer loop starts here
             "/*0020*/ LDG.E R3, desc[UR4][R8.64+0x4] ;",          # inner product loop
             "/*0030*/ @!P0 LDG.E R4, desc[UR4][R10.64] ;",
             "/*0040*/ FFMA R5, R2, R3, R5 ;",
             "/*0050*/ FFMA R6, R2, R4, R6 ;",
             "/*0060*/ FFMA R5, R3, R4, R5 ;",
             "/*0070*/ @P1 FFMA R6, R3, R2, R6 ;",
             "/*0080*/ @P2 BRA 0x20 ;",
             "/*0090*/ SHFL.BFLY PT, R7, R5, 0x1, 0x1f ;",         # a reduction loop
             "/*00a0*/ FFMA R5, R7, R2, R5 ;",
             "/*00b0*/ @P3 BRA 0x90 ;",
             "/*00c0*/ @P4 BRA 0x10 ;",
             "/*00d0*/ EXIT ;"]
    sass = "\n".join("        " + line for line in lines)
    # the product loop: 7 instructions for 4 multiply-adds = 2 steps of 2 -> 3.5 per step
    assert fused_resources.product_loops(sass, per_thread=2) == [3.5]
    assert fused_resources.product_loops("no code", per_thread=2) == []
    # its 2 loads for 2 steps; the reduction loop: 3 instructions, 1 shuffle, no barrier per pass
    assert fused_resources.product_loops(sass, per_thread=2, loads=True) == [1.0]
    assert fused_resources.sinkhorn_rounds(sass) == ["3 / 1 / 0"]
    assert fused_resources.sinkhorn_rounds("no code") == []
