"""Measurements behind the explanations in benchmarks/README.md (not setperm-vs-reference ratios).

    python -m benchmarks.internals [--threads 2] [--repeats 15] [--sorting-runs DIR] [--out runs/benchmarks]

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
"""
from __future__ import annotations

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

from setperm.functional import permutation_cost_gradient, sinkhorn
from setperm.sinkhorn import sinkhorn_scaling_in_range

from integrations.common import RunError, run_command

from .harness import (REPO, build, child_env, common_parser, median_time, naming_no_compiled, prepare, run_once, vqa,
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


def main(argv=None) -> int:
    p = common_parser(__doc__.split("\n\n")[0], prog="python -m benchmarks.internals")
    p.add_argument("--sorting-runs", type=Path, default=None,
                   help="folder of integrations.sorting run folders (for the fallback count)")
    p.add_argument("--sets", type=int, default=32, help="sets per interval in the fallback count")
    args = p.parse_args(argv)
    tiny = args.tiny
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
