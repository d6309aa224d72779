"""Measurements behind the explanations in benchmarks/README.md (not setperm-vs-reference ratios).

    python -m benchmarks.internals [--threads 2] [--repeats 15] [--sorting-runs DIR] [--out runs/benchmarks]

- ``sinkhorn``: fwd+bwd time of one Sinkhorn call (L = 4) on ``(64, 100, 100)`` logits, with the
  scaling vectors (the default path) and with the log-domain iterates (the fallback), side by side.
- ``system_time``: the share of process CPU time spent in the kernel (page faults of fresh
  allocations, ``getrusage``) over fwd+bwd calls of the VQA encoder, per kernel.
- ``compile``: wall time of the first three fwd+bwd calls of the VQA encoder with
  ``kernel="compiled"`` in a fresh process with an empty inductor cache, then again in a second
  fresh process with that cache warm, and of a first call at a new shape.
- ``fallback`` (with ``--sorting-runs``): how many Sinkhorn calls of trained PO-U sorting models
  (``integrations/sorting`` run folders) take the scaling-vector path vs the log-domain fallback,
  on sets drawn from [0, 1], [0, 10] and [0, 1000].
"""
from __future__ import annotations

import importlib
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

from .harness import REPO, build, common_parser, machine_info, median_time, run_once, vqa, write_results

_sinkhorn_mod = importlib.import_module("setperm.sinkhorn")   # the package's `sinkhorn` name is the function


def sinkhorn_paths(batch: int, n: int, repeats: int) -> Dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    z = (3 * torch.randn(batch, n, n, generator=gen)).requires_grad_(True)
    up = torch.randn(batch, n, n, generator=gen)
    fast = _sinkhorn_mod._scalings

    def fb():
        (_sinkhorn_mod.sinkhorn(z, iters=4) * up).sum().backward()

    out = {"scaling_fb_ms": 1e3 * median_time(fb, 3, repeats)}
    _sinkhorn_mod._scalings = lambda z, iters, check=True: None     # force the log-domain path
    try:
        out["log_domain_fb_ms"] = 1e3 * median_time(fb, 3, repeats)
    finally:
        _sinkhorn_mod._scalings = fast
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
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache,
               "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for name in ("empty_cache", "warm_cache"):
            res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"compile probe failed:\n{res.stderr[-2000:]}")
            out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def fallback_counts(runs: Path, sets: int) -> List[Dict[str, object]]:
    from integrations.common import latest_checkpoint, load_checkpoint
    from integrations.sorting.model import build_model

    fast = _sinkhorn_mod._scalings
    counts = {"fast": 0, "log": 0}

    def counting(z, iters, check=True):
        result = fast(z, iters, check)
        counts["fast" if result is not None else "log"] += 1
        return result

    rows = []
    _sinkhorn_mod._scalings = counting
    try:
        for cfg_path in sorted(runs.glob("*/config.json")):
            cfg = json.loads(cfg_path.read_text())
            cfg = cfg.get("config", cfg)
            ckpt = latest_checkpoint(cfg_path.parent / "checkpoints")
            if cfg.get("model") != "po-u" or ckpt is None:
                continue
            model = build_model(cfg)
            load_checkpoint(ckpt, model=model, restore_rng=False)
            counts.update(fast=0, log=0)
            gen = torch.Generator().manual_seed(0)
            for hi in (1.0, 10.0, 1000.0):
                with torch.no_grad():
                    model(torch.rand(sets, cfg["set_size"], 1, generator=gen) * hi)
            rows.append({"run": cfg_path.parent.name, "eta": float(model.eta.detach()), **counts})
    finally:
        _sinkhorn_mod._scalings = fast
    return rows


def main(argv=None) -> int:
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--sorting-runs", type=Path, default=None,
                   help="folder of integrations.sorting run folders (for the fallback count)")
    p.add_argument("--sets", type=int, default=32, help="sets per interval in the fallback count")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    tiny = args.tiny
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
    write_results(args.out / ("internals_tiny.json" if tiny else "internals.json"), info, args, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
