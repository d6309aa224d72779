"""Measurements behind the explanations in benchmarks/README.md (not setperm-vs-reference ratios).

    python -m benchmarks.internals [--threads 2] [--repeats 15] [--sorting-runs DIR] [--out runs/benchmarks]
    python -m benchmarks.internals --readout [--readout-hidden 16,32,...] [--readout-conditions 1,2,1busy] ...

- ``sinkhorn``: fwd+bwd time of one Sinkhorn call (L = 4) on ``(64, 100, 100)`` logits, with the
  scaling vectors (``method="scaling"``, what ``"auto"`` uses when it can) and with the log-domain
  iterates (``method="log"``, the fallback), side by side.
- ``system_time``: the share of process CPU time spent in the kernel (page faults of fresh
  allocations, ``getrusage``) over fwd+bwd calls of the VQA encoder, per kernel.
- ``compile``: wall time of the first three fwd+bwd calls of the VQA encoder with
  ``kernel="compiled"`` in a fresh process with an empty inductor cache, then again in a second
  fresh process with that cache warm, and of a first call at a new shape.
- ``fallback`` (with ``--sorting-runs``): how many Sinkhorn calls of trained PO-U sorting models
  (``integrations/sorting`` run folders) take the scaling-vector path vs the log-domain fallback,
  on sets drawn from [0, 1], [0, 10] and [0, 1000] (decided by the predicate
  ``setperm.sinkhorn.sinkhorn_scaling_in_range``, no patching of setperm's internals).
- ``readout`` (``--readout``: this alone, into ``internals_readout.json``): fwd+bwd of the
  encoder's LSTM read (``setperm.encoder.last_state``) with each method (``"grouped"``,
  ``"packed"``, ``"padded"``) and what ``"auto"`` picks, over a grid of reader widths, batches,
  set sizes N, input widths D and size distributions (all full, uniform in 1..N, BAN's 10..N
  boxes), under each of ``--readout-conditions`` (``1`` / ``2``: that many threads, ``1busy``: one
  thread while another process keeps one core busy). The methods alternate inside each cell (the
  first one rotates), and each row records the medians, the spread and the cost model's counts
  (distinct sizes, the steps each method runs).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from setperm.encoder import READ_COSTS_NS, read_cost_model
from setperm.functional import permutation_cost_gradient, sinkhorn
from setperm.sinkhorn import sinkhorn_scaling_in_range

from integrations.common import RunError, run_command

from .harness import (REPO, build, busy_core, child_env, common_parser, median_time, naming_no_compiled, prepare, run_once, vqa,
                      write_results)


def sinkhorn_paths(batch: int, n: int, repeats: int) -> Dict[str, float]:
    """fwd+bwd ms of one Sinkhorn call with each computation (``method="scaling"`` / ``"log"``)."""
    gen = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(batch, n, n, generator=gen)).requires_grad_(True)
    up = torch.randn(batch, n, n, generator=gen)
    out = {}
    for key, method in (("scaling_fb_ms", "scaling"), ("log_domain_fb_ms", "log")):
        def fb(method=method):
            (sinkhorn(z, iters=4, method=method) * up).sum().backward()

        out[key] = 1e3 * median_time(fb, 3, repeats)
    return out


def system_time_share(cfg, calls: int) -> Dict[str, float]:
    out = {}
    for impl in ("setperm", "setperm-compiled"):
        mod, x, w = build(cfg, impl)
        for _ in range(2):
            run_once(mod, x, w, "fb")
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(calls):
            run_once(mod, x, w, "fb")
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        user, system = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
        out[impl] = system / (user + system)
    return out


_COMPILE_PROBE = """
import json, sys, time, torch
from benchmarks.harness import build, run_once, vqa
torch.set_num_threads({threads})
times = []
mod, x, w = build(vqa({n}, {batch}), "setperm-compiled")
for _ in range(3):
    t = time.perf_counter(); run_once(mod, x, w, "fb"); times.append(time.perf_counter() - t)
mod, x, w = build(vqa({n2}, {batch2}), "setperm-compiled")
t = time.perf_counter(); run_once(mod, x, w, "fb"); times.append(time.perf_counter() - t)
print(json.dumps(times))
"""


def compile_times(threads: int, n: int, batch: int, n2: int, batch2: int) -> Dict[str, List[float]]:
    code = _COMPILE_PROBE.format(threads=threads, n=n, batch=batch, n2=n2, batch2=batch2)
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {**child_env(), "TORCHINDUCTOR_CACHE_DIR": cache}
        for name in ("empty_cache", "warm_cache"):
            res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"compile probe failed:\n{res.stderr[-2000:]}")
            out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def sinkhorn_path_counts(po, x: torch.Tensor) -> Dict[str, int]:
    """How many of the T + 1 Sinkhorn calls of the PO-U optimiser ``po`` on ``x`` (B, N, D) take
    the scaling-vector path (``"fast"``) and how many fall back to the log-domain iterates
    (``"log"``) with ``method="auto"``. Algorithm 1 is replayed with setperm's functions,
    asking :func:`setperm.sinkhorn.sinkhorn_scaling_in_range` before each call; the replay must give
    ``po(x)``."""
    if po.permutation != "po-u" or po.grid is not None or po.cost is None:
        raise ValueError(f"sinkhorn_path_counts replays PO-U on sequences only, got {po.permutation!r} grid={po.grid}")
    counts = {"fast": 0, "log": 0}
    with torch.no_grad():
        C = po.cost(x)
        logits = x.new_zeros(x.shape[0], x.shape[1], x.shape[1])                 # PO-U: P~(0) = 0
        for t in range(po.steps + 1):
            fast = sinkhorn_scaling_in_range(logits, iters=po.sinkhorn_iters, temperature=po.temperature)
            counts["fast" if fast else "log"] += 1
            P = sinkhorn(logits, iters=po.sinkhorn_iters, temperature=po.temperature)
            if t < po.steps:
                logits = logits - po.eta * permutation_cost_gradient(C, P)        # eq. 7 with eq. 4
        torch.testing.assert_close(P, po(x), rtol=1e-4, atol=1e-5)
    return counts


def sorting_runs(runs: Path) -> List[Path]:
    """The trained PO-U sorting run folders under ``runs`` (``--sorting-runs``): folders with a
    ``config.json`` of ``permutation`` ``po-u`` and a checkpoint. A missing folder, or one that holds
    none, is a :class:`RunError` naming ``--sorting-runs``."""
    from integrations.common import latest_checkpoint

    if not runs.is_dir():
        raise RunError(f"--sorting-runs {runs}: no such folder; give the folder that holds the "
                       f"integrations.sorting run folders")
    found = []
    for cfg_path in sorted(runs.glob("*/config.json")):
        if latest_checkpoint(cfg_path.parent / "checkpoints") is None:
            continue
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and cfg.get("permutation", cfg.get("model")) == "po-u":
            found.append(cfg_path.parent)
    if not found:
        raise RunError(f"--sorting-runs {runs} holds no trained PO-U sorting run (<run>/config.json with a "
                       f"checkpoint); train them with python -m integrations.sorting train --out {runs}/<name>")
    return found


def fallback_counts(runs: Path, sets: int) -> List[Dict[str, object]]:
    """:func:`sinkhorn_path_counts` of every trained PO-U sorting run under ``runs`` on ``sets``
    sets from each of [0, 1], [0, 10] and [0, 1000] (:func:`sorting_runs`: none is an error)."""
    from integrations.sorting.train import load_trained

    rows = []
    for run in sorting_runs(runs):
        model, cfg = load_trained(run)
        if cfg.get("permutation", cfg.get("model")) != "po-u":
            continue
        counts = {"fast": 0, "log": 0}
        gen = torch.Generator().manual_seed(0)
        for hi in (1.0, 10.0, 1000.0):
            for k, v in sinkhorn_path_counts(model, torch.rand(sets, cfg["set_size"], 1, generator=gen) * hi).items():
                counts[k] += v
        rows.append({"run": run.name, "eta": float(model.eta.detach()), **counts})
    return rows


READOUT_METHODS = ("grouped", "packed", "padded")
READOUT_SIZES = ("full", "uniform", "ban")
READOUT_CONDITIONS = ("1", "2", "1busy")


def readout_lengths(sizes: str, batch: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """(batch,) set sizes: ``"full"`` all n, ``"uniform"`` uniform in 1..n, ``"ban"`` uniform in
    10..n (BAN's 10-100 boxes; all n where n <= 10)."""
    if sizes == "full":
        return torch.full((batch,), n, dtype=torch.int64)
    low = 1 if sizes == "uniform" else min(10, n)
    return torch.randint(low, n + 1, (batch,), generator=gen)


def readout_cell(hidden: int, batch: int, n: int, features: int, sizes: str, warmup: int, repeats: int,
                 seed: int = 0) -> Dict[str, object]:
    """fwd+bwd ms of :func:`setperm.encoder.last_state` with each of :data:`READOUT_METHODS` on one
    batch (an LSTM ``features -> hidden``, gradients into the sequence and the parameters), the
    methods alternating with the first one rotating; medians, min and max, and the method that
    ``"auto"`` takes."""
    import statistics

    from torch import nn

    from setperm.encoder import auto_method, last_state

    torch.manual_seed(seed)
    lstm = nn.LSTM(features, hidden, batch_first=True)
    gen = torch.Generator().manual_seed(seed)
    lengths = readout_lengths(sizes, batch, n, gen)
    seq = torch.randn(batch, n, features, generator=gen)
    up = torch.randn(batch, hidden, generator=gen)

    def fb(method: str) -> float:
        t0 = time.perf_counter()
        (last_state(lstm, seq.detach().requires_grad_(True), lengths, method=method) * up).sum().backward()
        return time.perf_counter() - t0

    times: Dict[str, List[float]] = {m: [] for m in READOUT_METHODS}
    for r in range(warmup + repeats):
        k = r % len(READOUT_METHODS)
        for method in READOUT_METHODS[k:] + READOUT_METHODS[:k]:
            t = fb(method)
            if r >= warmup:
                times[method].append(1e3 * t)
    distinct = torch.unique(lengths)
    row: Dict[str, object] = {"hidden": hidden, "batch": batch, "n": n, "features": features, "sizes": sizes,
                              "distinct": int(distinct.numel()), "grouped_steps": int(distinct.sum()),
                              "real_steps": int(lengths.sum())}
    for method, ts in times.items():
        row[f"{method}_ms"] = statistics.median(ts)
        row[f"{method}_min_ms"], row[f"{method}_max_ms"] = min(ts), max(ts)
    best = min(READOUT_METHODS, key=lambda m: row[f"{m}_ms"])
    row["best"] = best
    row["auto"] = auto_method(lstm, seq, lengths)
    row["auto_over_best"] = row[f"{row['auto']}_ms"] / row[f"{best}_ms"]
    row["grouped_over_best"] = row["grouped_ms"] / row[f"{best}_ms"]
    return row


def readout_grid(args) -> List[Dict[str, object]]:
    """:func:`readout_cell` over the grid of ``--readout-*`` under each ``--readout-conditions``
    (``BAN``'s distribution is left out where it equals ``full``, N <= 10)."""
    rows = []
    cells = [(h, b, n, d, s) for d in args.readout_features for h in args.readout_hidden for b in args.readout_batch
             for n in args.readout_n for s in args.readout_sizes if not (s == "ban" and n <= 10)]
    for condition in args.readout_conditions:
        torch.set_num_threads(2 if condition == "2" else 1)
        with busy_core() if condition.endswith("busy") else contextlib.nullcontext():
            for i, (h, b, n, d, s) in enumerate(cells):
                row = {"condition": condition,
                       **readout_cell(h, b, n, d, s, args.warmup, args.repeats, args.seed)}
                rows.append(row)
                print(f"[{condition} {i + 1}/{len(cells)}] " + json.dumps(
                    {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()
                     if not k.endswith(("min_ms", "max_ms"))}), flush=True)
    torch.set_num_threads(args.threads)
    return rows


def readout_summary(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Per condition: in how many cells ``"auto"`` and always-grouped are within 10 % of the fastest
    method, their geometric-mean and worst ratios to it, and, where grouped is more than 10 % slower,
    auto's time as a fraction of grouped's (geometric mean)."""
    import math

    out = []
    for condition in dict.fromkeys(r["condition"] for r in rows):
        sub = [r for r in rows if r["condition"] == condition]
        auto = [r["auto_over_best"] for r in sub]
        grouped = [r["grouped_over_best"] for r in sub]
        losing = [(a, g) for a, g in zip(auto, grouped) if g > 1.1]

        def gmean(values):
            return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None
        out.append({"condition": condition, "cells": len(sub),
                    "auto_within_10pct": sum(a <= 1.1 for a in auto) / len(sub),
                    "grouped_within_10pct": sum(g <= 1.1 for g in grouped) / len(sub),
                    "auto_gmean": gmean(auto), "grouped_gmean": gmean(grouped),
                    "auto_worst": max(auto), "grouped_worst": max(grouped),
                    "auto_slower_than_grouped_by_10pct": sum(a > 1.1 * g for a, g in zip(auto, grouped)),
                    "grouped_loses": len(losing), "auto_over_grouped_there": gmean([a / g for a, g in losing])})
    return out


READ_COST_TERMS = tuple(READ_COSTS_NS)


def fit_read_costs(rows: List[Dict[str, object]], threads: int) -> Dict[str, float]:
    """The constants (ns) of the cost model of ``setperm.encoder.read_costs`` (one reader call, one
    fused step, one row-step per ``H (H + D)``, one packed step, packed backward's zero fill per
    ``n^2 B H``) fitted to the three methods'
    median times of ``rows`` (``threads`` threads), least squares on log times."""
    import math

    import numpy as np
    from scipy.optimize import least_squares

    def predicted(c, r):
        return read_cost_model(dict(zip(READ_COST_TERMS, c)), r["hidden"], r["features"], r["batch"], r["n"],
                               r["distinct"], r["grouped_steps"], r["real_steps"], threads)

    scale = np.array([READ_COSTS_NS[t] for t in READ_COST_TERMS])     # fitted as factors of the library's constants

    def residuals(log_c):
        c = np.exp(log_c) * scale
        return np.array([math.log(predicted(c, r)[m]) - math.log(1e6 * r[f"{m}_ms"])
                         for r in rows for m in READOUT_METHODS])
    fit = least_squares(residuals, np.zeros(len(scale)), loss="soft_l1", f_scale=0.2)
    out = dict(zip(READ_COST_TERMS, (float(v) for v in np.exp(fit.x) * scale)))
    out["median_abs_log_error"] = float(np.median(np.abs(residuals(fit.x))))
    return out


def readout_table(rows: List[Dict[str, object]], condition: str, features: int, sizes: str) -> str:
    """Markdown: fwd+bwd ms of grouped / packed / padded per reader width and batch (rows) and N
    (columns) for one condition, input width and size distribution; the fastest in bold, auto's
    pick named."""
    sub = {(r["hidden"], r["batch"], r["n"]): r for r in rows
           if r["condition"] == condition and r["features"] == features and r["sizes"] == sizes}
    ns = sorted({k[2] for k in sub})
    lines = ["| H | B | " + " | ".join(f"N = {n}: grouped / packed / padded ms (auto)" for n in ns) + " |",
             "|---|---|" + "---|" * len(ns)]
    for h, b in sorted({k[:2] for k in sub}):
        cells = []
        for n in ns:
            r = sub.get((h, b, n))
            if r is None:
                cells.append("")
                continue
            ms = [f"**{r[f'{m}_ms']:.3g}**" if m == r["best"] else f"{r[f'{m}_ms']:.3g}" for m in READOUT_METHODS]
            cells.append(" / ".join(ms) + f" ({r['auto']})")
        lines.append(f"| {h} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _int_list(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def _choices(allowed):
    def parse(text: str) -> List[str]:
        values = [v for v in text.split(",") if v]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {allowed}, got {text!r}")
        return values
    return parse


def main(argv=None) -> int:
    p = common_parser(__doc__.split("\n\n")[0], prog="python -m benchmarks.internals")
    p.add_argument("--sorting-runs", type=Path, default=None,
                   help="folder of integrations.sorting run folders (for the fallback count)")
    p.add_argument("--sets", type=int, default=32, help="sets per interval in the fallback count")
    p.add_argument("--readout", action="store_true",
                   help="time only the LSTM read's methods over the --readout-* grid (internals_readout.json)")
    p.add_argument("--readout-hidden", type=_int_list, default=[16, 32, 64, 128, 256], help="reader widths")
    p.add_argument("--readout-batch", type=_int_list, default=[8, 64, 256], help="sets per batch")
    p.add_argument("--readout-n", type=_int_list, default=[10, 36, 100], help="padded set sizes N")
    p.add_argument("--readout-features", type=_int_list, default=[13, 64], help="input widths D")
    p.add_argument("--readout-sizes", type=_choices(READOUT_SIZES), default=list(READOUT_SIZES),
                   help="size distributions: full, uniform (1..N), ban (10..N)")
    p.add_argument("--readout-conditions", type=_choices(READOUT_CONDITIONS), default=list(READOUT_CONDITIONS),
                   help="1 / 2: threads; 1busy: one thread beside a process that keeps one core busy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tiny = args.tiny
    if args.readout:
        if tiny:
            args.readout_hidden, args.readout_batch, args.readout_n, args.readout_features = [4], [3], [12], [5]
        path, info = prepare(args, "internals_readout_tiny.json" if tiny else "internals_readout.json")
        rows = readout_grid(args)
        summary = readout_summary(rows)
        for row in summary:
            print("auto against grouped:", json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                                        for k, v in row.items()}))
        fits = {c: fit_read_costs([r for r in rows if r["condition"] == c], 2 if c == "2" else 1)
                for c in dict.fromkeys(r["condition"] for r in rows)} if not tiny else {}
        for c, fit in fits.items():
            print(f"cost model fitted to condition {c} (ns):", json.dumps({k: round(v, 3) for k, v in fit.items()}))
        for c in dict.fromkeys(r["condition"] for r in rows):
            print(f"\ncondition {c}, D = {args.readout_features[0]}, uniform sizes:\n"
                  + readout_table(rows, c, args.readout_features[0], "uniform"))
        write_results(path, info, args, readout=rows, readout_summary=summary, readout_fit=fits)
        print(f"results: {path}")
        return 0
    if args.sorting_runs is not None:
        sorting_runs(args.sorting_runs)             # refused before anything is measured or written
    path, info = prepare(args, "internals_tiny.json" if tiny else "internals.json")
    results: Dict[str, object] = {}
    results["sinkhorn"] = sinkhorn_paths(4 if tiny else 64, 12 if tiny else 100, args.repeats)
    print("sinkhorn fwd+bwd per call (ms):", json.dumps(results["sinkhorn"]))
    cfg = vqa(12, 4) if tiny else vqa(100, 64)
    results["system_time_share"] = system_time_share(cfg, 2 if tiny else 10)
    print("system share of CPU time:", json.dumps(results["system_time_share"]))
    if not args.no_compiled:
        results["compile_s"] = compile_times(args.threads, cfg.n, cfg.batch, 9 if tiny else 37, 3 if tiny else 16)
        print("compiled kernel, seconds of the first three calls and of a new shape:", json.dumps(results["compile_s"]))
    if args.sorting_runs is not None:
        results["fallback"] = fallback_counts(args.sorting_runs, args.sets)
        for row in results["fallback"]:
            print("sinkhorn paths:", json.dumps(row))
    write_results(path, info, args, **results)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_command(naming_no_compiled(main), "python -m benchmarks.internals"))
