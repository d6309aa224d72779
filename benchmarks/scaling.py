"""Scaling benchmark: fwd+bwd time and peak memory of the VQA encoder against the set size N and
the number of inner steps T, setperm and the reference side by side, with fitted log-log
exponents, and the share of time in the ordering cost, the inner optimisation and the LSTM.

    python -m benchmarks.scaling [--threads 2] [--batch 4] [--out runs/benchmarks]

N sweep: encoder (13-d, pairwise hidden 128, T = 3, LSTM 128) on ``--batch`` sets of N = 10 ... 1024
(the reference is skipped where its estimated peak exceeds --ref-mem-limit-gb). Exponents are
least-squares slopes of log(time) and log(memory) against log(N) over N >= --fit-min.
T sweep: ``--t-batch`` sets of N = 100, T = 1 ... 8. Breakdown: the three functional pieces timed
alone (benchmarks.harness.breakdown) at the VQA configuration (64 sets, N = 100) and at the
largest N of the sweep.
"""
from __future__ import annotations

import math
import sys
from typing import Dict, List, Optional, Sequence

import torch

from integrations.common import run_command

from .harness import (Config, announce, breakdown, build, common_parser, impls_of, markdown_table,
                      naming_no_compiled, prepare, probe_memory, run_once, timed, vqa, write_results)


def fit_exponent(xs: Sequence[float], ys: Sequence[Optional[float]], x_min: float) -> Optional[float]:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and x >= x_min]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx


def linear_slope(xs: Sequence[float], ys: Sequence[Optional[float]]) -> Optional[float]:
    """Least-squares slope of y against x (time is linear in T: ms per inner step)."""
    pts = [(x, y) for x, y in zip(xs, ys) if y]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)


def sweep(cfgs: List[Config], args, key: str) -> List[Dict[str, object]]:
    rows = []
    jobs = [(cfg, impl) for cfg in cfgs for impl in impls_of(args)]
    for i, (cfg, impl) in enumerate(jobs, 1):
        name = f"{key}={getattr(cfg, key.lower())} {impl}"
        t0 = announce(i, len(jobs), name)
        row: Dict[str, object] = {"impl": impl, "N": cfg.n, "T": cfg.steps, "B": cfg.batch}
        if impl == "reference" and cfg.estimate_reference_bytes() > args.ref_mem_limit_gb * 2 ** 30:
            row["skipped"] = f"estimated {cfg.estimate_reference_bytes() / 2 ** 30:.0f} GiB"
            rows.append(row)
            continue
        mod, x, w = build(cfg, impl, device=args.device, layout=args.layout)
        wall, cpu = timed(lambda: run_once(mod, x, w, "fb"), args.warmup, args.repeats, args.device)
        row["fb_ms"], row["fb_cpu_ms"] = 1e3 * wall, 1e3 * cpu
        del mod, x, w
        if not args.no_memory:
            peak = probe_memory(cfg, impl, "fb", args.threads, args.device, args.layout)
            row["fb_mem_mb"] = None if peak is None else peak / 2 ** 20
        rows.append(row)
        announce(i, len(jobs), name, t0)
    return rows


def plot(path, n_rows, t_rows, exps) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for impl, style in (("setperm", "o-"), ("setperm-compiled", "^-"), ("reference", "s--")):
        r = [x for x in n_rows if x["impl"] == impl and x.get("fb_ms")]
        axes[0].loglog([x["N"] for x in r], [x["fb_ms"] for x in r], style,
                       label=f"{impl} (slope {exps.get(impl + '_time_N') or float('nan'):.2f})")
        rm = [x for x in r if x.get("fb_mem_mb")]
        axes[1].loglog([x["N"] for x in rm], [x["fb_mem_mb"] for x in rm], style,
                       label=f"{impl} (slope {exps.get(impl + '_mem_N') or float('nan'):.2f})")
        rt = [x for x in t_rows if x["impl"] == impl and x.get("fb_ms")]
        axes[2].plot([x["T"] for x in rt], [x["fb_ms"] for x in rt], style, label=impl)
    axes[0].set(xlabel="set size N", ylabel="fwd+bwd time (ms)", title="time vs N")
    axes[1].set(xlabel="set size N", ylabel="fwd+bwd peak above baseline (MiB)", title="memory vs N")
    axes[2].set(xlabel="inner steps T", ylabel="fwd+bwd time (ms)", title="time vs T (N = 100)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = common_parser(__doc__.split("\n\n")[0], prog="python -m benchmarks.scaling")
    p.add_argument("--batch", type=int, default=4, help="sets per batch in the N sweep")
    p.add_argument("--sizes", default="10,20,50,100,200,400,700,1024")
    p.add_argument("--t-batch", type=int, default=16, help="sets per batch in the T sweep (N = 100)")
    p.add_argument("--steps", default="1,2,3,4,6,8")
    p.add_argument("--fit-min", type=float, default=100, help="fit exponents over N >= this")
    p.add_argument("--no-breakdown", action="store_true")
    args = p.parse_args(argv)
    stem = "scaling_tiny" if args.tiny else "scaling"
    path, info = prepare(args, f"{stem}.json")
    sizes = [int(s) for s in args.sizes.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    if args.tiny:
        sizes, steps, args.batch, args.t_batch = [4, 8, 16], [1, 2], 2, 2
    n_cfgs = [vqa(n, args.batch) for n in sizes]
    t_cfgs = [vqa(24 if args.tiny else 100, args.t_batch, steps=t) for t in steps]
    n_rows = sweep(n_cfgs, args, "N")
    t_rows = sweep(t_cfgs, args, "steps")
    fit_min = min(sizes) if args.tiny else args.fit_min
    exps = {}
    for impl in impls_of(args):
        r = [x for x in n_rows if x["impl"] == impl]
        exps[impl + "_time_N"] = fit_exponent([x["N"] for x in r], [x.get("fb_ms") for x in r], fit_min)
        exps[impl + "_cpu_time_N"] = fit_exponent([x["N"] for x in r], [x.get("fb_cpu_ms") for x in r], fit_min)
        exps[impl + "_mem_N"] = fit_exponent([x["N"] for x in r], [x.get("fb_mem_mb") for x in r], fit_min)
        rt = [x for x in t_rows if x["impl"] == impl]
        exps[impl + "_ms_per_step_T"] = linear_slope([x["T"] for x in rt], [x.get("fb_ms") for x in rt])
    shares = []
    if not args.no_breakdown:
        for cfg in ([vqa(8, 2)] if args.tiny else [vqa(100, 64), vqa(max(sizes), args.batch)]):
            for impl in impls_of(args):
                if impl == "reference" and cfg.estimate_reference_bytes() > args.ref_mem_limit_gb * 2 ** 30:
                    continue
                b = breakdown(cfg, impl, args.warmup, args.repeats, args.device, args.layout)
                tot = b["cost"] + b["optimise"] + b["lstm"]
                tot_cpu = b["cost_cpu"] + b["optimise_cpu"] + b["lstm_cpu"]
                shares.append({"config": cfg.name, "impl": impl, **{k + "_ms": 1e3 * v for k, v in b.items()},
                               **{k + "_share": b[k] / tot for k in ("cost", "optimise", "lstm")},
                               **{k + "_cpu_share": b[k + "_cpu"] / tot_cpu for k in ("cost", "optimise", "lstm")}})
    cols = [("impl", "implementation"), ("N", "N"), ("T", "T"), ("B", "B"), ("fb_ms", "fwd+bwd ms"),
            ("fb_cpu_ms", "fwd+bwd CPU ms"), ("fb_mem_mb", "fwd+bwd peak MiB"), ("skipped", "note")]
    t1 = markdown_table(n_rows, cols)
    t2 = markdown_table(t_rows, cols)
    t3 = markdown_table([{"quantity": k, "exponent": v} for k, v in exps.items()],
                        [("quantity", "fitted slope (log-log for N; ms per step for T)"), ("exponent", "value")])
    t4 = markdown_table(shares, [("config", "configuration"), ("impl", "implementation"), ("cost_ms", "cost ms"),
                                 ("optimise_ms", "optimisation ms"), ("lstm_ms", "permute+LSTM ms"),
                                 ("cost_share", "cost share"), ("optimise_share", "optimisation share"),
                                 ("lstm_share", "LSTM share"), ("cost_cpu_share", "cost share (CPU time)"),
                                 ("optimise_cpu_share", "optimisation share (CPU time)"),
                                 ("lstm_cpu_share", "LSTM share (CPU time)")])
    print("## time and memory vs N\n\n" + t1 + "\n\n## time vs T\n\n" + t2 + f"\n\n## exponents (N >= {fit_min:g})\n\n"
          + t3 + "\n\n## share of time (fwd+bwd of each piece alone)\n\n" + t4)
    write_results(path, info, args, n_rows=n_rows, t_rows=t_rows, exponents=exps, shares=shares)
    plot(args.out / f"{stem}.png", n_rows, t_rows, exps)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(naming_no_compiled(main), "python -m benchmarks.scaling"))
