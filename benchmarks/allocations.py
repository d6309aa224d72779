"""The memory the VQA layer allocates in one call, counted on the CPU: no GPU needed.

    python -m benchmarks.allocations [--out runs/benchmarks]
    python -m benchmarks.allocations --tiny                 # tiny sizes (tests)

What ``benchmarks.gpu``'s memory columns read on a GPU (``torch.cuda.max_memory_allocated`` during
one call less what was allocated before it), counted by torch's CPU allocator: the profiler records
every allocation and free with the allocator's running total (its trace's ``Total Allocated``), and
the peak of that total during the call, less the total before it, is the row's figure. Beside it,
the blocks alive at the peak, summed by the operation that allocated them (the outermost one: a
module's operator such as ``aten::lstm``, an autograd function such as ``_FusedOptimize``, or, in
backward, the node being evaluated), so that each row says what its peak is made of. Exact bytes
(the allocator's, not a process's resident memory as ``benchmarks.layer``'s probes measure), the
same from run to run.

Rows: the layer of ``benchmarks.gpu``'s layer table (the VQA-configuration encoder, paper appendix
F.4: 13-d elements, pairwise MLP hidden 128, T = 3, LSTM 128, relevance weights; full sets) with
``kernel="fused"``, the default on CUDA, and the read the encoder takes for full sets (one call of
its LSTM on the whole batch), and the same with ``read="fused"`` (:mod:`setperm.fused_read`), each in
forward (no gradients) and forward + backward. Triton's interpreter runs the fused kernels (this
command sets ``TRITON_INTERPRET=1`` before Triton is first imported): they allocate here the tensors
they allocate on CUDA (their outputs, what forward keeps for backward), except their scratch: a slot
per program the GPU holds at once there, and here, where the interpreter runs one program at a
time, ``setperm.fused.INTERPRETER_SLOTS`` (the caption gives the bytes a GPU's slots add). What
differs from a GPU besides: the LSTM call runs torch's CPU LSTM, whose training workspace is oneDNN's, not
cuDNN's (those blocks say what the fused read replaces here, not what cuDNN holds); the pairwise MLP
is compiled by inductor's C++ backend, not into Triton kernels; the CPU takes its data-dependent
choices on the host (equal elements by hashing, not by the exact float64 product that CUDA
computes: ``(B, N, N)`` temporaries of forward's, freed before its LSTM call); and nothing here is
a caching allocator's rounding or a library's workspace.

Results: ``<out>/allocations.json`` and ``allocations.md`` (``allocations_tiny.*`` with ``--tiny``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch

from integrations.common import ensure_new, run_command

from .gpu import FUSED_READ_LABEL, _run, _setperm, layer_configs
from .harness import DEFAULT_OUT, markdown_table, prepare, vqa, write_tables

IMPLS = (("setperm (fused)", "auto"), (FUSED_READ_LABEL, "fused"))
COLUMNS = [("config", "configuration"), ("impl", "implementation"), ("mode", "call"), ("peak_mib", "peak MiB"),
           ("parts", "alive at the peak, by the operation that allocated them (MiB)"), ("note", "note")]
# blocks below this share of the peak are summed into one "other" entry of a row's parts
SMALL = 0.02


def peak_allocated(fn: Callable[[], object]) -> Tuple[int, List[Tuple[str, int]]]:
    """``(bytes, parts)``: the peak of torch's CPU allocator during ``fn()`` above what was allocated
    before it, and the blocks alive at that peak as ``(operation, bytes)``, summed by the outermost
    operation that allocated them, largest first."""
    gc.collect()
    with tempfile.TemporaryDirectory() as tmp:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text(encoding="utf-8"))["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
                    key=lambda e: e["ts"])
    if not memory:
        return 0, []
    first = memory[0]["args"]
    base = peak = first["Total Allocated"] - first["Bytes"]
    live: Dict[int, Tuple[int, float]] = {}
    at_peak: Dict[int, Tuple[int, float]] = {}
    for event in memory:
        args = event["args"]
        if args["Bytes"] > 0:
            live[args["Addr"]] = (args["Bytes"], event["ts"])
        else:
            live.pop(args["Addr"], None)            # (a block allocated before the call is not followed)
        if args["Total Allocated"] > peak:
            peak, at_peak = args["Total Allocated"], dict(live)
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    parts: Dict[str, int] = {}
    for size, ts in at_peak.values():
        name = _outermost(ops, ts)
        parts[name] = parts.get(name, 0) + size
    return peak - base, sorted(parts.items(), key=lambda kv: -kv[1])


def _outermost(ops: List[dict], ts: float) -> str:
    """The outermost operation running at ``ts`` (a backward node by its name), or ``"?"``."""
    enclosing = [e for e in ops if e["ts"] <= ts <= e["ts"] + e.get("dur", 0)]
    if not enclosing:
        return "?"
    outer = min(enclosing, key=lambda e: (e["ts"], -e.get("dur", 0)))
    prefix = "autograd::engine::evaluate_function: "
    return f"{outer['name'][len(prefix):]} (backward)" if outer["name"].startswith(prefix) else outer["name"]


def _parts_text(parts: List[Tuple[str, int]], peak: int) -> str:
    big = [(name, size) for name, size in parts if size >= SMALL * peak]
    rest = sum(size for name, size in parts if size < SMALL * peak)
    return ", ".join([f"{name} {size / 2 ** 20:.3g}" for name, size in big]
                     + ([f"other {rest / 2 ** 20:.3g}"] if rest else []))


def rows(args) -> List[Dict[str, object]]:
    from setperm import fused

    interpreted = fused.applies(torch.zeros(1, 4, 4), 3)
    configs = layer_configs(True) if args.tiny else [vqa(n, b) for b, n in args.configs]
    out = []
    for cfg in configs:
        for label, read in IMPLS:
            mod, inputs = _setperm(cfg, "fused", torch.device("cpu"), read=read)
            _run(mod, inputs, "fb", released=False)          # first call: compiles, builds caches
            for mode in ("fwd", "fb"):
                peak, parts = peak_allocated(lambda: _run(mod, inputs, mode, released=False))
                row: Dict[str, object] = {"config": cfg.name, "impl": label, "mode": "fwd" if mode == "fwd" else "fwd+bwd",
                                          "peak_mib": peak / 2 ** 20, "parts": _parts_text(parts, peak),
                                          "blocks": [[name, size] for name, size in parts]}
                if not interpreted:
                    row["note"] = "the fused kernels did not run (Triton's interpreter was not chosen): the unrolled steps"
                out.append(row)
                print(f"{cfg.name:<18} {label:<28} {row['mode']:<8} peak {row['peak_mib']:8.1f} MiB: {row['parts']}",
                      flush=True)
            del mod, inputs
    return out


def _configs(text: str) -> List[Tuple[int, int]]:
    """``"256x100,64x100"`` -> ``[(256, 100), (64, 100)]`` (sets B x size N)."""
    try:
        pairs = [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected comma-separated BxN pairs such as 256x100, got {text!r}")
    return pairs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.allocations", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=_configs, default=_configs("64x100,256x100"),
                   help="sets x set size of the VQA layer, comma-separated (default 64x100,256x100)")
    p.add_argument("--tiny", action="store_true", help="benchmarks.gpu's tiny layer configurations (tests)")
    p.add_argument("--threads", type=int, default=1, help="torch's CPU threads (default 1; counts do not depend on it)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default runs/benchmarks)")
    p.add_argument("--overwrite", action="store_true", help="replace this benchmark's earlier results in --out")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if "triton" not in sys.modules:
        # (before Triton is first imported, which the first fused call does: its interpreter then runs
        # the kernels on CPU tensors; a process that imported Triton before keeps its choice, and the
        # rows say when the kernels did not run)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    stem = "allocations_tiny" if args.tiny else "allocations"
    path, info = prepare(args, f"{stem}.json", timed=False)
    table_path = ensure_new(args.out / f"{stem}.md", overwrite=args.overwrite)
    table = rows(args)
    from setperm import fused

    tile = fused.MAX_SET_SIZE
    slot_mib = tile * tile * 4 / 2 ** 20
    text = "\n".join([
        f"Peak bytes allocated by one call, counted by torch's CPU allocator (torch {torch.__version__}; the fused "
        "kernels in Triton's interpreter, the LSTM call on the CPU's LSTM): `python -m benchmarks.allocations"
        + (" --tiny" if args.tiny else "") + "`. The fused kernels' scratch has "
        f"{fused.INTERPRETER_SLOTS} slots here (the interpreter runs one program at a time); on a GPU, a slot per "
        f"program it holds at once: at {tile} x {tile} one per multiprocessor, {2 * slot_mib:g} MiB each in forward "
        f"and {3 * slot_mib:g} MiB in backward (132 multiprocessors: {132 * 2 * slot_mib:g} and {132 * 3 * slot_mib:g} MiB).",
        "", markdown_table(table, COLUMNS)])
    write_tables(path, table_path, info, args, text, layer=table)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "python -m benchmarks.allocations"))
