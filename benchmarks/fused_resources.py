"""What the compiler gives setperm.fused's Triton kernels on a CUDA architecture, without a GPU.

    python -m benchmarks.fused_resources [--arch 90] [--blocks 16,32,64,128] [--warps 1,2,4,8,16,32]
                                         [--out runs/benchmarks]

Compiles ``forward_kernel`` and ``backward_kernel`` of ``setperm._fused_kernels`` with Triton for
the given architecture (``--arch 90``: sm_90, H100 / H200) at every tile size (the set size rounded
up to a power of two, >= 16; each as a masked batch launches it, a tile per set) and number of warps, and reads from each compiled binary
(``cuobjdump -res-usage``, from Triton's NVIDIA backend): registers per thread, the stack frame
per thread (spilled registers and arrays the compiler could not keep in registers: local memory,
far slower than registers) and shared memory per block; and, from the machine code
(``cuobjdump -sass``), the instructions per step ``k`` of each loop of the matrix products (the
``(N, N)`` products of eq. 7 and its backward, loops of outer products: ``N`` steps per product,
the kernels' longest-running loops, so the column shows the work each thread issues there; a loop
the compiler unrolled counts per step, its remainder loop is listed after it), the global loads per
step of the same loops (each a request to the L1 cache, whose throughput bounds these loops as much
as the issue of instructions does), and per round of the loops that reduce across threads (the
Sinkhorn normalisation's, forward's and backward's) its instructions, shuffles and barriers.
Compiling needs no GPU, so these figures
come before any device time is spent; the warps per tile size of ``setperm.fused`` were chosen from
them (no stack, or the least, at the fewest registers). ``--c-in-place`` compiles the kernels as
``fused_optimize(stage_c=False)`` runs them (the matrix products read the cost matrix where it
is, instead of from a zero-padded copy in a scratch tile). Output: ``<out>/fused_resources.json``
and ``.md`` (``fused_resources_c_in_place.*`` with ``--c-in-place``); the row that
``setperm.fused`` uses is marked.

``--read`` compiles the fused LSTM read's kernels instead (``lstm_forward_kernel`` and
``lstm_backward_kernel`` of ``setperm._fused_read_kernels``, saving for backward) at every hidden
tile (``--blocks``: the LSTM's units rounded up to a power of two, 16-256) and number of warps, in
float32 with and without TF32 and in float64, at ``setperm.fused_read``'s chunk of the products'
inner dimension and pipelined chunks; output ``fused_resources_read.*``. ``setperm.fused_read``'s
warps and its largest tile were chosen from these (8 warps spill least at 128 units, a few dozen bytes
forward; at 256 units every configuration spills hundreds).
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Dict, List, Optional

from integrations.common import ensure_new, run_command, write_json
from integrations.common.atomic import atomic_write
from integrations.common.lifecycle import RunError

from setperm.fused import failure_text

from .harness import DEFAULT_OUT, markdown_table

KERNELS = ("forward_kernel", "backward_kernel")
POINTERS = {"mask_ptr": "*u8", "slots_ptr": "*i32"}          # the rest point to float32
INT_SCALARS = ("N", "steps", "iters", "slots")
# constexpr values compiled: masked sets, saving for backward, no PO-LA start (their usual case),
# C staged in a scratch tile (setperm.fused's default; --c-in-place: read where it is)
CONSTEXPRS = {"HAS_INIT": False, "HAS_MASK": True, "SAVE": True, "WANT_INIT": False, "STAGE_C": True}
COLUMNS = [("block", "tile"), ("warps", "warps"), ("kernel", "kernel"), ("registers", "registers / thread"),
           ("stack", "stack bytes / thread"), ("shared", "shared memory / block"),
           ("product_loops", "instructions per step of the product loops"),
           ("product_loads", "global loads per step of the product loops"),
           ("sinkhorn", "per round of the Sinkhorn loops: instructions / shuffles / barriers"),
           ("used", "used by setperm.fused"),
           ("note", "note")]


def _signature(fn, block: int, stage_c: bool = True):
    """The kernel's argument types, its constexprs' values and the indices of its pointers: a launch
    tells Triton that each pointer is 16-byte aligned (every tensor torch allocates is), which the
    compiled code depends on (vectorised loads and stores, the shared memory they stage through), so
    the pointers are compiled with that hint here too; the ints are compiled without hints, as a
    launch compiles a set size that is not a multiple of 16 (the usual case) and T, L > 1."""
    values = {**CONSTEXPRS, "STAGE_C": stage_c, "BLOCK": block, **_tile_constexprs(block)}
    sig, constexprs, pointers = {}, {}, []
    for i, name in enumerate(fn.arg_names):
        if name in values:
            sig[name] = "constexpr"
            constexprs[(i,)] = values[name]
        elif name.endswith("_ptr"):
            sig[name] = POINTERS.get(name, "*fp32")
            pointers.append(i)
        else:
            sig[name] = "i32" if name in INT_SCALARS else "fp32"
    return sig, constexprs, pointers


def _tile_constexprs(block: int) -> Dict[str, int]:
    """The launch's span range and mask width at this tile, as setperm.fused launches masked sets
    (a tile per set)."""
    from setperm.fused import MAX_SET_SIZE, _tiles

    smaller = dict(_tiles(MAX_SET_SIZE, per_set=True))[block]
    return {"SPANS": True, "SMALLER": smaller, "WIDE": MAX_SET_SIZE}


def _cuobjdump(triton_module) -> str:
    bundled = Path(triton_module.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if found is None:
        raise RunError("cuobjdump not found (neither in Triton's NVIDIA backend nor on PATH)")
    return found


def _source(fn, block: int, stage_c: bool = True):
    """The kernel at one tile size as Triton's compiler takes it."""
    return _ast(fn, *_signature(fn, block, stage_c))


def _read_source(fn, block_h: int, precision: str):
    """A fused-read kernel at one hidden tile and precision (``"tf32"``, ``"ieee"``: float32 without
    TF32, ``"float64"``) as Triton's compiler takes it; pointers 16-byte aligned, ints without hints."""
    from setperm import fused_read

    values = {"SAVE": True, "TF32": precision == "tf32", "BLOCK_B": fused_read.BLOCK_B, "BLOCK_H": block_h,
              "BLOCK_K": fused_read.BLOCK_K}
    sig, constexprs, pointers = {}, {}, []
    for i, name in enumerate(fn.arg_names):
        if name in values:
            sig[name] = "constexpr"
            constexprs[(i,)] = values[name]
        elif name.endswith("_ptr"):
            sig[name] = "*i64" if name == "len_ptr" else "*fp64" if precision == "float64" else "*fp32"
            pointers.append(i)
        else:
            sig[name] = "i32"
    return _ast(fn, sig, constexprs, pointers)


def _ast(fn, sig, constexprs, pointers):
    # (Triton's compiler interface differs by release)
    from triton.compiler import ASTSource

    if "constexprs" in inspect.signature(ASTSource.__init__).parameters:          # Triton 3.3 and newer
        return ASTSource(fn=fn, signature=sig, constexprs=constexprs,
                         attrs={(i,): [["tt.divisibility", 16]] for i in pointers})
    # Triton 3.2: the constexprs' values by name, the signature without them, the hints as a descriptor
    from triton.backends.compiler import AttrsDescriptor

    return ASTSource(fn=fn, signature={k: v for k, v in sig.items() if v != "constexpr"},
                     constants={fn.arg_names[i]: v for (i,), v in constexprs.items()},
                     attrs=AttrsDescriptor.from_hints({i: 16 for i in pointers}))


_SASS_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _innermost_loops(sass: str) -> List[List[str]]:
    """The opcodes (predicates dropped) of every innermost loop in ``sass`` (``cuobjdump -sass`` of one
    kernel: a backward branch with no such branch inside), in the order of the code."""
    code = [(int(m[1], 16), m[2]) for m in map(_SASS_LINE.match, sass.splitlines()) if m]
    index = {address: i for i, (address, _) in enumerate(code)}
    loops = []
    for i, (address, text) in enumerate(code):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target[1], 16) < address and int(target[1], 16) in index:
            loops.append((index[int(target[1], 16)], i))
    return [[re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for _, text in code[start:end + 1]]
            for start, end in loops
            if not any(start < s2 and e2 <= end for s2, e2 in loops if (s2, e2) != (start, end))]


def _count(ops: List[str], *prefixes: str) -> int:
    return sum(op.startswith(prefixes) for op in ops)


def product_loops(sass: str, per_thread: int, loads: bool = False) -> List[float]:
    """Instructions per step of every loop of outer products in ``sass``, in the order of the code:
    the innermost loops that multiply-add (FFMA) and hold no shuffle or barrier (the Sinkhorn loops
    reduce across threads); a step is ``per_thread`` multiply-adds, one per tile entry a thread
    holds. ``loads``: the global loads (LDG, of any width) per step instead."""
    out = []
    for ops in _innermost_loops(sass):
        fmas = _count(ops, "FFMA")
        if fmas and not _count(ops, "SHFL", "BAR"):
            out.append(round((_count(ops, "LDG") if loads else len(ops)) * per_thread / fmas, 1))
    return out


def sinkhorn_rounds(sass: str) -> List[str]:
    """``"instructions / shuffles / barriers"`` per pass of every loop that reduces across threads
    (a shuffle): the Sinkhorn normalisation's rounds of a row and a column half-step, forward's
    and backward's, in the order of the code."""
    return [f"{len(ops)} / {_count(ops, 'SHFL')} / {_count(ops, 'BAR')}" for ops in _innermost_loops(sass)
            if _count(ops, "SHFL")]


def resources(fn, block: int, warps: int, arch: int, cuobjdump: str, stage_c: bool = True) -> Dict[str, object]:
    row = _compiled(_source(fn, block, stage_c), warps, arch, cuobjdump, {})
    sass = row.pop("sass")
    per_thread = max(1, block * block // (32 * warps))
    for key, values in (("product_loops", product_loops(sass, per_thread)),
                        ("product_loads", product_loops(sass, per_thread, loads=True)),
                        ("sinkhorn", sinkhorn_rounds(sass))):
        row[key] = ", ".join(f"{v:g}" if isinstance(v, float) else v for v in values) if values else "-"
    return row


def read_resources(fn, block_h: int, precision: str, warps: int, arch: int, cuobjdump: str) -> Dict[str, object]:
    from setperm import fused_read

    row = _compiled(_read_source(fn, block_h, precision), warps, arch, cuobjdump, {"num_stages": fused_read.STAGES})
    row.pop("sass")
    return row


def _compiled(source, warps: int, arch: int, cuobjdump: str, options: dict) -> Dict[str, object]:
    """Registers and stack per thread, shared memory per block and the machine code of one compile."""
    import triton
    from triton.backends.compiler import GPUTarget

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "enable_fp_fusion": True, **options})   # (as launched)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(compiled.asm["cubin"])
        report = subprocess.run([cuobjdump, "-res-usage", str(path)], capture_output=True, text=True, check=True)
        sass = subprocess.run([cuobjdump, "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    fields = {}
    for line in report.stdout.splitlines():
        if "REG:" in line:
            fields = dict(part.split(":", 1) for part in line.split() if ":" in part)
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "shared": int(compiled.metadata.shared),
            "sass": sass}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fused_resources", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default 90: H100 / H200)")
    p.add_argument("--blocks", default=None,
                   help="tile sizes, comma-separated (powers of two, 16-128; with --read, hidden tiles 16-256; "
                        "default all of them)")
    p.add_argument("--warps", default=None,
                   help="warps per program, comma-separated (default 1,2,4,8,16,32; with --read 4,8,16)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default runs/benchmarks)")
    p.add_argument("--c-in-place", action="store_true",
                   help="compile the kernels as fused_optimize(stage_c=False) runs them: the matrix products read "
                        "the cost matrix where it is, not from a copy in a scratch tile")
    p.add_argument("--read", action="store_true",
                   help="compile the fused LSTM read's kernels (setperm.fused_read) instead, in float32 with and "
                        "without TF32 and in float64 (default warps 4,8,16)")
    p.add_argument("--overwrite", action="store_true", help="replace this command's earlier results in --out")
    return p


def _compile_rows(builds) -> List[Dict[str, object]]:
    """Each ``(row, build)``'s row with what ``build()`` reads off its compiled kernel, or a note of why
    it failed (one failing build must not lose the others), each reported on stderr as it comes."""
    rows = []
    for row, build in builds:
        try:
            row.update(build())
        except OSError:
            # the machine's, not the kernel's (Triton's cache folder unwritable, say): one line naming
            # the path, before anything is written
            raise
        except Exception as err:
            row["note"] = f"failed: {failure_text(err)[:120]}"
        rows.append(row)
        print(", ".join(f"{k} {v}" for k, v in row.items() if k != "used"), file=sys.stderr, flush=True)
    return rows


def _ints(p: argparse.ArgumentParser, flag: str, text: str, allowed) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v not in allowed for v in values):
        p.error(f"{flag}: expected a comma-separated list of {sorted(allowed)}, got {text!r}")
    return values


def unsupported() -> Optional[str]:
    """Why this tool cannot compile here (None if it can): the reason ``setperm.fused`` gives
    (Triton missing, or older than the kernels need)."""
    from setperm import fused

    return fused.unavailable()


def main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.read and args.c_in_place:
        p.error("--c-in-place: a setting of the permutation-optimisation kernels, not of --read's")
    tiles = {16, 32, 64, 128, 256} if args.read else {16, 32, 64, 128}
    blocks = _ints(p, "--blocks", args.blocks or ",".join(map(str, sorted(tiles))), tiles)
    warps = _ints(p, "--warps", args.warps or ("4,8,16" if args.read else "1,2,4,8,16,32"), {1, 2, 4, 8, 16, 32})
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RunError("TRITON_INTERPRET=1 runs Triton's interpreter, which compiles nothing: unset it")
    reason = unsupported()
    if reason is not None:
        raise RunError(reason)
    import triton
    from setperm import _fused_kernels
    from setperm.fused import _warps

    if args.out.exists() and not args.out.is_dir():
        raise RunError(f"--out {args.out} is a file, not a folder")
    if args.read:
        return _main_read(args, blocks, warps, triton)
    stem = "fused_resources_c_in_place" if args.c_in_place else "fused_resources"
    path = ensure_new(args.out / f"{stem}.json", overwrite=args.overwrite)
    table_path = ensure_new(args.out / f"{stem}.md", overwrite=args.overwrite)
    cuobjdump = _cuobjdump(triton)
    rows = _compile_rows(
        ({"block": block, "warps": w, "kernel": name, "used": "yes" if _warps(block) == w else ""},
         lambda block=block, w=w, name=name: resources(getattr(_fused_kernels, name), block, w, args.arch, cuobjdump,
                                                       not args.c_in_place))
        for block in blocks for w in warps for name in KERNELS)
    info = {"triton": triton.__version__, "arch": f"sm_{args.arch}", "stage_c": not args.c_in_place}
    write_json(path, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    command = "python -m benchmarks.fused_resources" + (" --c-in-place" if args.c_in_place else "")
    variant = ", C read in place (stage_c=False)" if args.c_in_place else ""
    table = (f"Resources of setperm.fused's kernels{variant} compiled for sm_{args.arch} by Triton "
             f"{triton.__version__} (`{command}`):\n\n" + markdown_table(rows, COLUMNS) + "\n")
    atomic_write(table_path, lambda f: f.write(table.encode()), durable=False)
    print(table)
    return 0


READ_KERNELS = ("lstm_forward_kernel", "lstm_backward_kernel")
READ_PRECISIONS = ("tf32", "ieee", "float64")
READ_COLUMNS = [("block", "hidden tile"), ("warps", "warps"), ("kernel", "kernel"), ("precision", "precision"),
                ("registers", "registers / thread"), ("stack", "stack bytes / thread"),
                ("shared", "shared memory / block"), ("used", "used by setperm.fused_read"), ("note", "note")]


def _main_read(args, blocks: List[int], warps: List[int], triton) -> int:
    """``--read``: the fused LSTM read's kernels at every hidden tile, warps and precision."""
    from setperm import _fused_read_kernels, fused, fused_read

    path = ensure_new(args.out / "fused_resources_read.json", overwrite=args.overwrite)
    table_path = ensure_new(args.out / "fused_resources_read.md", overwrite=args.overwrite)
    cuobjdump = _cuobjdump(triton)
    largest = fused._block(fused_read.MAX_HIDDEN)
    rows = _compile_rows(
        ({"block": block, "warps": w, "kernel": name, "precision": precision,
          "used": "yes" if block <= largest and w == fused_read.WARPS else ""},
         lambda block=block, w=w, precision=precision, name=name: read_resources(
             getattr(_fused_read_kernels, name), block, precision, w, args.arch, cuobjdump))
        for block in blocks for w in warps for precision in READ_PRECISIONS for name in READ_KERNELS)
    info = {"triton": triton.__version__, "arch": f"sm_{args.arch}", "block_b": fused_read.BLOCK_B,
            "block_k": fused_read.BLOCK_K, "num_stages": fused_read.STAGES}
    write_json(path, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})
    table = (f"Resources of setperm.fused_read's kernels compiled for sm_{args.arch} by Triton {triton.__version__}, "
             f"{fused_read.BLOCK_B} sequences per program, products in chunks of {fused_read.BLOCK_K}, "
             f"{fused_read.STAGES} chunks in flight (`python -m benchmarks.fused_resources --read`):\n\n"
             + markdown_table(rows, READ_COLUMNS) + "\n")
    atomic_write(table_path, lambda f: f.write(table.encode()), durable=False)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "python -m benchmarks.fused_resources"))
