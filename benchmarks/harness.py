"""Shared machinery of the benchmarks: configurations, timing, fresh-process memory, tables.

Timing: median wall-clock time of ``--repeats`` calls after ``--warmup`` calls, with
``torch.set_num_threads(--threads)`` (default: the training commands' default, one thread). "fwd" runs under ``torch.no_grad()`` (inference);
"fwd+bwd" runs the forward with autograd and backpropagates ``out.sum()`` into the parameters and
the input.

Memory: every (configuration, implementation, mode) is measured in a *fresh* Python process
(``python -m benchmarks.harness --probe ...``): after importing torch, building the module,
allocating the inputs and one warm-up call (which compiles ``setperm-compiled``), freed heap is
returned to the OS (``malloc_trim``) and the kernel's peak-RSS mark is reset to the current
resident set size (``/proc/self/clear_refs``), which is the baseline; one call is made and the peak
resident set size (``VmHWM``, the per-process form of ``ru_maxrss``) is read. The difference is the
peak memory the call needs above the baseline. On CUDA the allocator's peak (``torch.cuda.max_memory_allocated``) above the
allocated baseline is used instead.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import setperm
from setperm.pairwise import KernelBuildError
from integrations.common import ensure_new, write_json
from integrations.common.cli import DEFAULT_THREADS, add_threads_argument, device_name
from integrations.common.lifecycle import RunError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("runs") / "benchmarks"
IMPLS = ("setperm", "setperm-compiled", "reference")
# setperm's two pairwise kernels (setperm.pairwise): "chunked" (default) and "compiled" (torch.compile)
KERNEL_OF = {"setperm": "chunked", "setperm-compiled": "compiled"}


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmarked layer. ``kind`` is ``"encoder"`` (PermutationSetEncoder, VQA) or
    ``"optimizer"`` (PermutationOptimization: sorting, mosaics)."""

    name: str
    kind: str
    in_features: int
    hidden: int            # pairwise MLP hidden width (paper F)
    steps: int             # T
    n: int                 # set size N
    batch: int             # number of sets B
    lstm_hidden: int = 128
    grid: Optional[Tuple[int, int]] = None
    permutation: str = "po-u"  # "po-la" for the mosaics
    weights: bool = True   # encoder: relevance logits (sigmoid-weighted elements, F.4)

    def estimate_reference_bytes(self) -> float:
        """Rough peak of the reference fwd+bwd: pairs, hidden activations of both MLP passes and
        their gradients (~6 H + 4 D floats per pair), and ~20 saved (N, N) tensors per Sinkhorn call."""
        per_pair = 6 * self.hidden + 4 * self.in_features + 20 * (self.steps + 1)
        return 4.0 * self.batch * self.n * self.n * per_pair


def vqa(n: int, batch: int, steps: int = 3) -> Config:
    return Config(f"vqa B={batch} N={n}" + ("" if steps == 3 else f" T={steps}"), "encoder", 13, 128, steps, n, batch)


def sorting(n: int, batch: int) -> Config:
    return Config(f"sort B={batch} N={n}", "optimizer", 1, 16, 6, n, batch)


def mosaic(side: int, batch: int = 32, tile: Optional[int] = None, channels: int = 64) -> Config:
    # MNIST tiles: ceil(28 / side) px, features = conv channels * (tile // 2)^2 (paper F.2, released MosaicNet)
    tile = tile if tile is not None else -(-28 // side)
    feat = channels * (tile // 2) ** 2
    return Config(f"mosaic {side}x{side} B={batch} D={feat}", "optimizer", feat, 64, 4, side * side, batch,
                  grid=(side, side), permutation="po-la", weights=False)


def tiny_configs() -> List[Config]:
    return [Config("tiny vqa", "encoder", 5, 8, 2, 6, 3, lstm_hidden=7),
            Config("tiny sort", "optimizer", 1, 4, 3, 7, 2),
            Config("tiny mosaic", "optimizer", 6, 8, 2, 4, 2, grid=(2, 2), permutation="po-la", weights=False)]


def build(cfg: Config, impl: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu",
          layout: str = "linear"):
    """Module and inputs of ``cfg`` for ``impl`` (one of :data:`IMPLS`); every implementation gets the
    same weights and inputs."""
    from setperm import PermutationOptimization, PermutationSetEncoder

    from .reference import reference_from_setperm

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if cfg.kind == "encoder":
        # check_finite=False: the encoder checks its input itself, once
        po = PermutationOptimization(cfg.in_features, cost_hidden=cfg.hidden, steps=cfg.steps, check_finite=False)
        mod = PermutationSetEncoder(cfg.in_features, cfg.lstm_hidden, po)
    else:
        mod = PermutationOptimization(cfg.in_features, cost_hidden=cfg.hidden, steps=cfg.steps,
                                      permutation=cfg.permutation,
                                      num_positions=cfg.n if cfg.permutation == "po-la" else None, grid=cfg.grid)
    cost = mod.po.cost if cfg.kind == "encoder" else mod.cost
    with torch.no_grad():   # non-zero biases (the init zeroes them), so the first-layer bias is really compared
        cost.first.bias.normal_(0, 0.1, generator=gen)
    if impl == "reference":
        mod = reference_from_setperm(mod, layout=layout)
    elif impl in KERNEL_OF:
        cost.kernel = KERNEL_OF[impl]
    else:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    mod = mod.to(device=device, dtype=dtype)
    x = torch.randn(cfg.batch, cfg.n, cfg.in_features, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(cfg.batch, cfg.n, generator=gen).to(device=device, dtype=dtype) if (
        cfg.kind == "encoder" and cfg.weights) else None
    return mod, x, w


def call(mod: nn.Module, x: Tensor, w: Optional[Tensor]) -> Tensor:
    return mod(x) if w is None else mod(x, weights=w)


def run_once(mod: nn.Module, x: Tensor, w: Optional[Tensor], mode: str) -> None:
    if mode == "fwd":
        with torch.no_grad():
            call(mod, x, w)
    elif mode == "fb":
        xr = x.detach().requires_grad_(True)
        call(mod, xr, w).sum().backward()
    else:
        raise ValueError(f"mode must be 'fwd' or 'fb', got {mode!r}")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], warmup: int = 1, repeats: int = 5, device: str = "cpu") -> Tuple[float, float]:
    """Median wall-clock seconds and median process CPU seconds (all threads) of ``repeats`` calls
    after ``warmup`` calls. On a busy machine the CPU time is the steadier of the two."""
    for _ in range(warmup):
        fn()
    _sync(device)
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


@contextlib.contextmanager
def busy_core():
    """One other process keeps one core busy while the block runs (a Python loop that never
    sleeps): the case of a shared machine, where threads that wait for a taken core slow work down."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True:\n    pass"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)                      # let it reach the loop
        yield
    finally:
        spinner.kill()
        spinner.wait()


def median_time(fn: Callable[[], object], warmup: int = 1, repeats: int = 5, device: str = "cpu") -> float:
    """Median wall-clock seconds of ``repeats`` calls after ``warmup`` calls."""
    return timed(fn, warmup, repeats, device)[0]


# ----------------------------------------------------------------------------------------- memory
def _status_bytes(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024                        # kB
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Return free heap memory to the OS (glibc); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_rss_bytes() -> int:
    # VmHWM belongs to this process's address space. ru_maxrss is NOT used directly: Linux carries
    # the parent's peak into a child across fork + exec, which hides the child's own peak whenever
    # the parent (this benchmark) has already run a larger configuration.
    hwm = _status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_env() -> Dict[str, str]:
    """The environment of a measuring child process: it imports the ``setperm`` this process
    imported and the checkout's ``benchmarks``."""
    package_root = str(Path(setperm.__file__).resolve().parents[1])
    paths = [package_root, str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def probe_memory(cfg: Config, impl: str, mode: str, threads: int, device: str = "cpu", layout: str = "linear",
                 timeout: float = 1800) -> Optional[int]:
    """Peak bytes above the baseline of one call, measured in a fresh process (None on failure)."""
    cmd = [sys.executable, "-m", "benchmarks.harness", "--probe", json.dumps(dataclasses.asdict(cfg)),
           "--impl", impl, "--mode", mode, "--threads", str(threads), "--device", device, "--layout", layout]
    env = child_env()
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if res.returncode != 0:
        sys.stderr.write(f"memory probe failed for {cfg.name} {impl} {mode}:\n{res.stderr[-2000:]}\n")
        return None
    return int(json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"])


def _probe_main(args) -> None:
    d = json.loads(args.probe)
    if d.get("grid") is not None:
        d["grid"] = tuple(d["grid"])
    cfg = Config(**d)
    torch.set_num_threads(args.threads)
    mod, x, w = build(cfg, args.impl, device=args.device, layout=args.layout)
    if args.device.startswith("cuda"):
        run_once(mod, x, w, args.mode)                  # warm-up (compilation), as on CPU
        mod.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(mod, x, w, args.mode)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # One warm-up call first (the compiled kernel compiles on its first call, and that is not the
        # layer's memory), then freed memory is handed back to the OS so that the next call's
        # allocations show up in the resident set again.
        run_once(mod, x, w, args.mode)
        mod.zero_grad(set_to_none=True)
        gc.collect()
        _malloc_trim()
        if _reset_peak_rss():
            base = _status_bytes("VmRSS")
        else:
            base = _peak_rss_bytes()
        run_once(mod, x, w, args.mode)
        peak = _peak_rss_bytes() - base
    print(json.dumps({"peak_bytes": int(peak)}))


# ------------------------------------------------------------------------------------- comparisons
def max_output_diff(cfg: Config, seed: int = 0, layout: str = "linear", other: str = "reference") -> float:
    """Max abs difference of the outputs (encoder: h; optimiser: P) of setperm (chunked) vs ``other``."""
    outs = []
    for impl in ("setperm", other):
        mod, x, w = build(cfg, impl, seed=seed, layout=layout)
        with torch.no_grad():
            outs.append(call(mod, x, w))
    return float((outs[0] - outs[1]).abs().max())


# ------------------------------------------------------------------------------------ breakdown
def breakdown(cfg: Config, impl: str, warmup: int = 1, repeats: int = 3, device: str = "cpu",
              layout: str = "linear") -> Dict[str, float]:
    """Median fwd+bwd seconds of the three functional pieces of an encoder, each timed alone with a
    random upstream gradient: the ordering cost (eq. 8-10), the inner optimisation (algorithm 1
    lines 5-11, from a leaf ``C``) and the permutation + LSTM (from a leaf ``P``)."""
    from setperm.functional import apply_permutation, optimize_permutation

    from .reference import reference_permute

    if cfg.kind != "encoder":
        raise ValueError("breakdown is defined for the encoder configurations")
    mod, x, w = build(cfg, impl, device=device, layout=layout)
    gen = torch.Generator().manual_seed(1)
    K = 1
    rC = torch.randn(cfg.batch, K, cfg.n, cfg.n, generator=gen).to(device)
    rP = torch.randn(cfg.batch, cfg.n, cfg.n, generator=gen).to(device)
    po = mod.po
    with torch.no_grad():
        C0 = po.cost(x)
        P0 = torch.softmax(torch.randn(cfg.batch, cfg.n, cfg.n, generator=gen).to(device), -1)
    xw = x if w is None else x * torch.sigmoid(w).unsqueeze(-1)

    def cost():
        (po.cost(x.detach().requires_grad_(True)) * rC).sum().backward()

    def optimise():
        C = C0.detach().requires_grad_(True)
        if impl in KERNEL_OF:
            P = optimize_permutation(C, eta=po.eta, steps=po.steps, sinkhorn_iters=po.sinkhorn_iters)
        else:
            P = po.optimize(C, x)
        (P * rP).sum().backward()

    def lstm():
        P = P0.detach().requires_grad_(True)
        y = apply_permutation(xw, P) if impl in KERNEL_OF else reference_permute(xw, P)
        mod.lstm(y)[1][1].sum().backward()

    out = {}
    for name, fn in (("cost", cost), ("optimise", optimise), ("lstm", lstm)):
        out[name], out[name + "_cpu"] = timed(fn, warmup, repeats, device)
    return out


# ------------------------------------------------------------------------------------------ output
def machine_info(threads: int, timed: bool = True) -> Dict[str, object]:
    """The machine's description for a result file; ``timed``: warn when the load would slow the
    timings (a command that times nothing, ``benchmarks.flops``, passes False)."""
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name")), "")
    except OSError:
        pass
    if timed:
        check_load(threads)
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "python": platform.python_version(), "cpu_model": model, "cores": os.cpu_count(), "threads": threads,
            "loadavg_start": list(os.getloadavg())}


def check_load(threads: int) -> None:
    """Warn on stderr when the machine is busier than the benchmark's thread count: timings taken
    beside other work are slower and noisier (ratios measured side by side suffer least)."""
    load = os.getloadavg()[0]
    if load > threads:
        print(f"warning: load average {load:.1f} exceeds --threads {threads}: other work is running, timings will "
              "be slower and noisier", file=sys.stderr, flush=True)


def announce(i: int, n: int, name: str, started: Optional[float] = None) -> float:
    """Print ``[i/n] start|done <name>`` on stderr; returns the time for the matching 'done' call."""
    now = time.perf_counter()
    if started is None:
        print(f"[{i}/{n}] start {name}", file=sys.stderr, flush=True)
    else:
        print(f"[{i}/{n}] done  {name} ({now - started:.1f} s)", file=sys.stderr, flush=True)
    return now


def markdown_table(rows: Sequence[Dict[str, object]], columns: Sequence[Tuple[str, str]]) -> str:
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e3 else f"{v:.0f}"
        return str(v)
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(key)) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_results(path: Path, info: Dict[str, object], args: argparse.Namespace, **results: object) -> None:
    """Write a script's JSON: the machine (with the load at the end of the run), the resolved
    arguments and the results."""
    info["loadavg_end"] = list(os.getloadavg())
    write_json(path, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, **results})


def write_tables(path: Path, table_path: Path, info: Dict[str, object], args: argparse.Namespace, text: str,
                 **results: object) -> None:
    """A counting script's results: the JSON (:func:`write_results`, with ``text`` as its ``table``),
    the markdown ``text`` at ``table_path``, and ``text`` and the JSON's path printed."""
    from integrations.common.atomic import atomic_write

    write_results(path, info, args, **results, table=text)
    atomic_write(table_path, lambda f: f.write((text + "\n").encode()), durable=False)
    print(text)
    print(f"results: {path}")


def impls_of(args: argparse.Namespace) -> List[str]:
    """The implementations a benchmark run compares (``--no-compiled`` drops setperm-compiled)."""
    return [i for i in IMPLS if not (args.no_compiled and i == "setperm-compiled")]


def common_parser(description: str, prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The flags every timing benchmark shares; ``prog``: the command (``python -m benchmarks.<name>``)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder for JSON/PNG (default ./runs/benchmarks)")
    p.add_argument("--overwrite", action="store_true", help="replace this benchmark's earlier results in --out")
    add_threads_argument(p)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed calls; the median is reported")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda")
    p.add_argument("--layout", default="linear", choices=["linear", "conv1d"],
                   help="reference MLP layout: nn.Linear channels-last or the released code's Conv1d(k=1)")
    p.add_argument("--ref-mem-limit-gb", type=float, default=8.0,
                   help="skip the reference where its estimated peak exceeds this (default 8 GiB)")
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory probes")
    p.add_argument("--tiny", action="store_true",
                   help="tiny configurations, used by the tests: seconds with --no-memory --no-compiled; the memory "
                        "probes (a fresh Python process per configuration, implementation and mode) and the first "
                        "torch.compile of the compiled kernel add one to two minutes")
    p.add_argument("--no-compiled", action="store_true",
                   help="skip setperm's torch.compile kernel (kernel='compiled'; needs a C++ compiler on CPU)")
    return p


def prepare(args: argparse.Namespace, name: str, timed: bool = True) -> Tuple[Path, Dict[str, object]]:
    """Before anything is measured: the result file ``<--out>/<name>`` (``--out`` must be a folder
    or not exist yet; an earlier result is replaced only with ``--overwrite``), the threads, and the
    machine's description (``timed``: see :func:`machine_info`). Returns ``(path, machine info)``."""
    if args.out.exists() and not args.out.is_dir():
        raise RunError(f"--out {args.out} is a file, not a folder")
    path = ensure_new(args.out / name, overwrite=args.overwrite)
    torch.set_num_threads(args.threads)
    return path, machine_info(args.threads, timed)


def naming_no_compiled(main: Callable[[Optional[Sequence[str]]], Optional[int]]):
    """``main`` made to end in one line, naming the cause and ``--no-compiled``, instead of a
    traceback where setperm's compiled kernel cannot be built on this machine."""
    @functools.wraps(main)
    def wrapped(argv: Optional[Sequence[str]] = None) -> Optional[int]:
        try:
            return main(argv)
        except KernelBuildError as err:
            raise RunError(f"{err} (--no-compiled measures without it)") from err
    return wrapped


def select(cfgs: Sequence[Config], only: Optional[str]) -> List[Config]:
    """The configurations whose name contains ``only`` (all without it); none is an error."""
    chosen = [c for c in cfgs if only is None or only in c.name]
    if not chosen:
        raise RunError(f"--only {only!r} matches no configuration; the names are: "
                       + ", ".join(repr(c.name) for c in cfgs))
    return chosen


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m benchmarks.harness",
                                 description="internal: memory probe of one configuration in a fresh process")
    ap.add_argument("--probe", required=True)
    ap.add_argument("--impl", required=True, choices=IMPLS)
    ap.add_argument("--mode", required=True, choices=["fwd", "fb"])
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layout", default="linear")
    _probe_main(ap.parse_args())
