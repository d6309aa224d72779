"""Layer benchmark: PermutationSetEncoder / PermutationOptimization at the paper's configurations,
setperm and the reference (:mod:`benchmarks.reference`) side by side in the same process.

    python -m benchmarks.layer [--threads 1] [--repeats 5] [--busy-core] [--out runs/benchmarks]

Configurations (paper appendix F): VQA encoder (13-d, pairwise hidden 128, T = 3, LSTM 128,
relevance weights) at N = 10, 36, 100 for 64 sets and 896 sets (batch 112 x 8 glimpses);
sorting optimiser (1-d, hidden 16, T = 6) at N = 100, 512, 1024 with B = 128, 8, 2 sets (chosen so
the reference fits a 24 GiB machine's memory); mosaic optimiser (PO-LA, lattice 3x3 / 5x5,
2 cost channels, hidden 64, T = 4, MNIST tile features 64 * (tile/2)^2, batch 32).
Asserts that the outputs match (max abs difference <= --tol) wherever both run.
"""
from __future__ import annotations

import sys
from typing import Dict, List

from integrations.common import run_command

from .harness import (Config, announce, build, busy_core, common_parser, markdown_table, max_output_diff, mosaic,
                      naming_no_compiled, prepare, probe_memory, run_once, select, sorting, timed, tiny_configs, vqa,
                      write_results)


def paper_configs() -> List[Config]:
    cfgs = [vqa(n, b) for b in (64, 896) for n in (10, 36, 100)]
    cfgs += [sorting(100, 128), sorting(512, 8), sorting(1024, 2)]
    cfgs += [mosaic(3), mosaic(5)]
    return cfgs


def _label(impl: str, layout: str) -> str:
    if impl == "reference":
        return f"reference ({'nn.Linear' if layout == 'linear' else 'Conv1d'})"
    return {"setperm": "setperm (chunked)", "setperm-compiled": "setperm (compiled)"}[impl]


def measure(cfg: Config, args, layouts=("linear",)) -> List[Dict[str, object]]:
    """Rows for setperm's two kernels and the reference (one row per reference MLP layout). The
    ratios reference / setperm are written on each setperm row; every other row's output is
    compared with setperm (chunked)'s."""
    variants = [("setperm", "linear")]
    if not args.no_compiled:
        variants.append(("setperm-compiled", "linear"))
    variants += [("reference", lay) for lay in layouts]
    rows = []
    for impl, layout in variants:
        row: Dict[str, object] = {"config": cfg.name, "impl": _label(impl, layout)}
        if impl == "reference" and cfg.estimate_reference_bytes() > args.ref_mem_limit_gb * 2 ** 30:
            row["skipped"] = (f"skipped: estimated peak {cfg.estimate_reference_bytes() / 2 ** 30:.0f} GiB > "
                              f"--ref-mem-limit-gb {args.ref_mem_limit_gb:g}")
            rows.append(row)
            continue
        mod, x, w = build(cfg, impl, device=args.device, layout=layout)
        for mode in ("fwd", "fb"):
            wall, cpu = timed(lambda: run_once(mod, x, w, mode), args.warmup, args.repeats, args.device)
            row[f"{mode}_ms"], row[f"{mode}_cpu_ms"] = 1e3 * wall, 1e3 * cpu
            if args.busy_core:
                with busy_core():
                    busy, _ = timed(lambda: run_once(mod, x, w, mode), args.warmup, args.repeats, args.device)
                row[f"{mode}_busy_ms"] = 1e3 * busy
                row[f"{mode}_busy_slowdown"] = busy / wall
        del mod, x, w
        if not args.no_memory:
            for mode in ("fwd", "fb"):
                peak = probe_memory(cfg, impl, mode, args.threads, args.device, layout)
                row[f"{mode}_mem_mb"] = None if peak is None else peak / 2 ** 20
        if impl != "setperm":
            diff = max_output_diff(cfg, layout=layout, other=impl)
            row["max_abs_diff"] = diff
            if not diff <= args.tol:
                raise AssertionError(f"{cfg.name}: setperm and {row['impl']} differ by {diff:.3g} > tol {args.tol:g}")
        rows.append(row)
    refs = {r["impl"]: r for r in rows if r["impl"].startswith("reference") and r.get("fb_ms")}
    for ours in rows:
        if not ours["impl"].startswith("setperm"):
            continue
        for ref_label, suffix in (("reference (nn.Linear)", ""), ("reference (Conv1d)", "_conv1d")):
            ref = refs.get(ref_label)
            if ref is None:
                continue
            ours["speedup_fb" + suffix] = ref["fb_ms"] / ours["fb_ms"]
            if not suffix:
                ours["speedup_fwd"] = ref["fwd_ms"] / ours["fwd_ms"]
                ours["speedup_fb_cpu"] = ref["fb_cpu_ms"] / ours["fb_cpu_ms"]
                if ours.get("fb_mem_mb") and ref.get("fb_mem_mb"):
                    ours["mem_ratio_fb"] = ref["fb_mem_mb"] / max(ours["fb_mem_mb"], 1e-3)
    return rows


COLUMNS = [("config", "configuration"), ("impl", "implementation"), ("fwd_ms", "fwd ms"), ("fb_ms", "fwd+bwd ms"),
           ("fb_cpu_ms", "fwd+bwd CPU ms"),
           ("fwd_mem_mb", "fwd peak MiB"), ("fb_mem_mb", "fwd+bwd peak MiB"),
           ("speedup_fwd", "fwd speed-up vs nn.Linear ref."), ("speedup_fb", "fwd+bwd speed-up vs nn.Linear ref."),
           ("speedup_fb_cpu", "fwd+bwd CPU-time speed-up vs nn.Linear ref."),
           ("speedup_fb_conv1d", "fwd+bwd speed-up vs Conv1d ref."),
           ("mem_ratio_fb", "fwd+bwd memory saving vs nn.Linear ref."),
           ("max_abs_diff", "max abs diff to setperm (chunked)"),
           ("fb_busy_ms", "fwd+bwd ms, one core busy"), ("fb_busy_slowdown", "fwd+bwd slowdown, one core busy"),
           ("skipped", "note")]


def main(argv=None) -> int:
    p = common_parser(__doc__.split("\n\n")[0], prog="python -m benchmarks.layer")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs output difference allowed (float32)")
    p.add_argument("--conv1d-on", default="vqa B=64 N=100",
                   help="also run the Conv1d (released-code layout) reference on configurations containing this")
    p.add_argument("--only", default=None, help="run only configurations whose name contains this string")
    p.add_argument("--busy-core", action="store_true",
                   help="also time every call while another process of the benchmark's own keeps one core busy, "
                        "and report the slowdown (a shared machine)")
    args = p.parse_args(argv)
    cfgs = select(tiny_configs() if args.tiny else paper_configs(), args.only)
    path, info = prepare(args, "layer_tiny.json" if args.tiny else "layer.json")
    rows = []
    for i, cfg in enumerate(cfgs, 1):
        t0 = announce(i, len(cfgs), cfg.name)
        conv = args.conv1d_on is not None and args.conv1d_on in cfg.name
        rows += measure(cfg, args, ("linear", "conv1d") if conv else ("linear",))
        announce(i, len(cfgs), cfg.name, t0)
    # the one-core-busy columns only where they were measured (else two columns of dashes)
    table = markdown_table(rows, [c for c in COLUMNS if args.busy_core or "busy" not in c[0]])
    print(table)
    write_results(path, info, args, rows=rows, table=table)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(naming_no_compiled(main), "python -m benchmarks.layer"))
