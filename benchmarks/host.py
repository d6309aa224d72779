"""The host's share of the layer's call on the path it takes on CUDA, measured on the CPU: no GPU needed.

    python -m benchmarks.host [--out runs/benchmarks]
    python -m benchmarks.host --tiny                  # few repeats (tests)

On a GPU the host (Python, torch's dispatcher, autograd's engine, each kernel's launch) queues the
work that the device then runs; a call takes at least as long as the host's part of it, whatever
the GPU. This command measures that part on the CPU: the layer of ``benchmarks.gpu``'s layer table
(the VQA configuration, paper appendix F.4: 13-d elements, T = 3, relevance weights) built as on
CUDA (``kernel="fused"``), with every data-dependent choice taken as on CUDA (setperm's
``host_decisions`` answer False: no host synchronisation, equal elements by the exact float64
product, the read without host lengths) and the fused kernels' launches left out (their outputs
are allocated, nothing is computed in them; Triton's interpreter makes them apply to CPU tensors).
The pairwise MLP's and the LSTM's widths are shrunk to 8 so that the CPU's own arithmetic is small
beside the host's work, which does not depend on them (the same operations at any width); the
sets keep the GPU table's size N = 100, so that the padded sets' tiles are those of BAN's 10-100
boxes.

Rows: full sets (the GPU layer table's) and padded sets (sizes 10-100, a ``mask``: BAN's), each
with the encoder's default read and with ``read="fused"`` (:mod:`setperm.fused_read`); forward (no
gradients) and forward + backward, median wall time of ``--repeats`` calls on one thread. The parts:
the pairwise cost (``po.cost``), the optimisation (``po`` less its cost), the read (the LSTM call,
or the fused read, on the permuted sequence) and the rest of the encoder (its checks, the weights,
``P^T x``), each timed alone (the rest as the total less the others); and the operations each call
runs, as the profiler lists them (outermost dispatcher operations that launch work on a GPU, views
and bare allocations left out), the compiled regions and the fused kernels' launches. What differs
from a GPU: a kernel's launch through the CUDA driver (a few microseconds each, not counted here),
Triton's launcher for the fused kernels (left out with their launches), cuDNN's host work in the
LSTM call (here the CPU's LSTM, which also computes: the read's time here is an upper bound of its
host share), the compiled regions' kernels (here inductor's C++ kernels, which compute) and the
host's speed itself.

Results: ``<out>/host.json`` and ``host.md`` (``host_tiny.*`` with ``--tiny``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from integrations.common import ensure_new, run_command

from .gpu import FUSED_READ_LABEL, _setperm
from .harness import DEFAULT_OUT, Config, markdown_table, prepare, write_tables

# setperm's modules whose data-dependent choices are taken on the host on the CPU and on the device on
# CUDA and under torch.compile (each imports setperm.masking.host_decisions by name, so each is
# answered on its own; the test suite's device_path fixture takes the same list)
HOST_DECIDING_MODULES = ("masking", "cost", "sinkhorn", "encoder", "assign")
# operations that launch no kernel on a GPU: views, metadata, bare allocations
NO_LAUNCH = frozenset("aten::" + name for name in (
    "view", "_unsafe_view", "unsqueeze", "squeeze", "reshape", "transpose", "t", "permute", "expand", "slice",
    "select", "narrow", "flatten", "unflatten", "movedim", "detach", "alias", "as_strided", "split", "chunk",
    "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "set_", "resize_", "lift_fresh",
    "promote_types", "result_type", "is_nonzero", "size", "stride", "numel", "dim", "view_as", "expand_as",
    "contiguous", "_reshape_alias", "unbind", "diagonal", "real", "imag", "conj", "resolve_conj", "resolve_neg"))
PARTS = (("cost", "cost"), ("optimisation", "optimisation"), ("read", "read"), ("rest", "rest of the encoder"))
COLUMNS = ([("config", "sets"), ("impl", "layer"), ("fwd_us", "fwd us"), ("fb_us", "fwd+bwd us")]
           + [(f"{key}_us", f"{label} us") for key, label in PARTS]
           + [("ops_fwd", "operations fwd"), ("ops_bwd", "operations bwd"), ("compiled", "compiled regions"),
              ("launches", "fused launches"), ("note", "note")])


@contextlib.contextmanager
def _patched(patches: List[Tuple[object, str, object]]) -> Iterator[None]:
    """``setattr(obj, name, value)`` for each patch, undone in reverse order on exit."""
    saved: List[Tuple[object, str, object]] = []
    try:
        for obj, name, value in patches:
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def host_decisions_as_on_cuda() -> contextlib.AbstractContextManager:
    """A context in which every setperm module's ``host_decisions`` answers False, as on CUDA: no
    data-dependent choice is taken on the host (the test suite's ``device_path`` fixture takes it too)."""
    return _patched([(importlib.import_module(f"setperm.{name}"), "host_decisions", lambda t: False)
                     for name in HOST_DECIDING_MODULES])


@contextlib.contextmanager
def cuda_decisions() -> Iterator[Dict[str, int]]:
    """setperm on the CPU taking the path it takes on CUDA, with the fused kernels' launches left out:
    every ``host_decisions`` answers False, Triton's interpreter makes the fused kernels apply to CPU
    tensors, and their launches return at once (the yielded dict counts them under ``"launches"``).
    Restores all on exit."""
    from setperm import fused, fused_read

    if not fused.interpreted():
        raise RuntimeError("the CUDA path runs on CPU tensors under Triton's interpreter: set TRITON_INTERPRET=1 "
                           "before Triton is first imported")
    counter = {"launches": 0}

    def launch(*args, **kwargs) -> None:
        counter["launches"] += 1
    with host_decisions_as_on_cuda(), _patched([(fused, "_launch", launch), (fused_read, "_launch", launch)]):
        yield counter


def median_us(calls: Dict[str, Callable[[], object]], warmup: int, repeats: int, rounds: int = 10) -> Dict[str, float]:
    """The median microseconds of ``repeats`` calls of each of ``calls``, timed in ``rounds`` rounds
    that take each call in turn (so that a slower spell of the machine falls on all of them alike)."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in calls}
    per_round = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for name, fn in calls.items():
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e6 for name, t in times.items()}


def count_operations(fn: Callable[[], object]) -> Tuple[int, int]:
    """``(operations, compiled regions)`` of ``fn()``: the outermost dispatcher operations the
    profiler records that launch work on a GPU (not :data:`NO_LAUNCH`; an ``aten::to`` only when it
    copies), and the compiled regions entered."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    operations = compiled = 0
    for event in prof.events():
        if event.name.startswith("Torch-Compiled Region"):
            compiled += 1
        if not event.name.startswith("aten::") or event.name in NO_LAUNCH:
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is not None:
            continue                              # inside another operation
        if event.name == "aten::to" and not event.cpu_children:
            continue                              # already in the dtype and on the device: no copy
        operations += 1
    return operations, compiled


def configs(b: int, n: int) -> List[Tuple[str, Config, bool]]:
    """(label, layer, padded): the VQA layer with widths 8, ``b`` sets of ``n`` elements, full and
    padded (sizes 10 to ``n``, the first set full)."""
    cfg = Config(f"vqa B={b} N={n} widths 8", "encoder", 13, 8, 3, n, b, lstm_hidden=8)
    return [(f"B={b} N={n}, full", cfg, False), (f"B={b} N={n}, sizes {min(10, n)}-{n}", cfg, True)]


def _inputs(cfg: Config, padded: bool, device: torch.device, read: str):
    mod, (x, w) = _setperm(cfg, "fused", device, read=read)
    mask = None
    if padded:
        g = torch.Generator().manual_seed(0)
        sizes = torch.randint(min(10, cfg.n), cfg.n + 1, (cfg.batch,), generator=g)
        sizes[0] = cfg.n
        mask = torch.arange(cfg.n) < sizes[:, None]
    return mod, x, w, mask


def _calls(mod, x: Tensor, w: Tensor, mask: Optional[Tensor]) -> Dict[str, Callable[[], object]]:
    """The timed calls: the encoder in forward and forward + backward, and its parts in forward +
    backward, each on inputs as the encoder gives them."""
    from setperm.assign import apply_permutation
    from setperm.encoder import _final_state, last_state

    kw = _kwargs(w, mask)
    xg = x.detach().requires_grad_(True)
    with torch.no_grad():
        seq = apply_permutation(x, mod(x, **kw, return_permutation=True)[1])    # the sequence the reader reads
    seq = seq.requires_grad_(True)
    lengths = mask.sum(1) if mask is not None else torch.full((x.shape[0],), x.shape[1])

    def read() -> Tensor:
        if mask is None and mod.read != "fused":
            return _final_state(mod.reader(seq))
        return last_state(mod.reader, seq, lengths, method=mod.read)

    def no_grad_forward() -> None:
        with torch.no_grad():
            mod(x, **kw)
    return {"fwd": no_grad_forward,
            "fb": lambda: mod(xg, **kw).sum().backward(),
            "permutation": lambda: mod.po(xg, mask=mask).sum().backward(),
            "cost": lambda: mod.po.cost(xg, mask).sum().backward(),
            "read": lambda: read().sum().backward()}


def rows(args) -> Iterator[Dict[str, object]]:
    device = torch.device("cpu")
    for label, cfg, padded in configs(args.sets, args.size):
        for impl, read in (("setperm (fused)", "auto"), (FUSED_READ_LABEL, "fused")):
            mod, x, w, mask = _inputs(cfg, padded, device, read)
            row: Dict[str, object] = {"config": label, "impl": impl}
            kw = _kwargs(w, mask)
            # (the fused kernels' outputs are left as allocated: no denormal slows the CPU's arithmetic on them)
            with cuda_decisions() as counter, _flush_denormal():
                calls = _calls(mod, x, w, mask)
                times = median_us(calls, args.warmup, args.repeats)
                row.update({"fwd_us": times["fwd"], "fb_us": times["fb"], "cost_us": times["cost"],
                            "optimisation_us": times["permutation"] - times["cost"], "read_us": times["read"],
                            "rest_us": times["fb"] - times["permutation"] - times["read"]})
                launches = {}
                outputs = {}

                def forward() -> None:
                    counter["launches"] = 0
                    outputs["h"] = mod(x.detach().requires_grad_(True), **kw)
                    launches["fwd"] = counter["launches"]

                def backward() -> None:
                    counter["launches"] = 0
                    outputs.pop("h").sum().backward()
                    launches["bwd"] = counter["launches"]
                ops_fwd, compiled_fwd = count_operations(forward)
                ops_bwd, compiled_bwd = count_operations(backward)
                row.update({"ops_fwd": ops_fwd, "ops_bwd": ops_bwd, "compiled": compiled_fwd + compiled_bwd,
                            "launches": launches["fwd"] + launches["bwd"]})
            print(f"{label:<22} {impl:<28} fwd {row['fwd_us']:7.0f} us  fwd+bwd {row['fb_us']:7.0f} us  "
                  + "  ".join(f"{key} {row[key + '_us']:.0f}" for key, _ in PARTS)
                  + f"  ops {ops_fwd} + {ops_bwd}, compiled {row['compiled']}, launches {row['launches']}", flush=True)
            yield row


@contextlib.contextmanager
def _flush_denormal() -> Iterator[None]:
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _kwargs(w: Tensor, mask: Optional[Tensor]) -> Dict[str, Tensor]:
    return {"weights": w} if mask is None else {"weights": w, "mask": mask}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", type=int, default=2, help="sets B (default 2: the host's work does not depend on B)")
    p.add_argument("--size", type=int, default=100, help="set size N (default 100: BAN's boxes, four tile sizes)")
    p.add_argument("--repeats", type=int, default=300,
                   help="timed calls per measurement (default 300, in 10 rounds that take the calls in turn; median)")
    p.add_argument("--warmup", type=int, default=30, help="untimed calls first (default 30)")
    p.add_argument("--tiny", action="store_true", help="tiny sets and 3 repeats (tests)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default runs/benchmarks)")
    p.add_argument("--overwrite", action="store_true", help="replace this benchmark's earlier results in --out")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        args.repeats, args.warmup, args.sets, args.size = 3, 1, 2, 9
    args.threads = 1
    if "triton" not in sys.modules:
        # (before Triton is first imported: its interpreter makes the fused kernels apply to CPU tensors)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    stem = "host_tiny" if args.tiny else "host"
    path, info = prepare(args, f"{stem}.json")
    table_path = ensure_new(args.out / f"{stem}.md", overwrite=args.overwrite)
    table = list(rows(args))
    text = "\n".join([
        f"The host's work in one call of the VQA layer on the path it takes on CUDA, measured on the CPU "
        f"({info['cpu_model'] or 'CPU'}, one thread, torch {torch.__version__}): `python -m benchmarks.host"
        + (" --tiny" if args.tiny else "") + "`. Median microseconds of "
        f"{args.repeats} calls, in 10 rounds that take the calls in turn (the parts are timed alone; the "
        "rest is the total less them); the fused kernels' launches left out, widths 8 (the host's work is the "
        "same at any width), the LSTM on the CPU (the read's time includes its arithmetic). Operations: "
        "the outermost dispatcher operations that launch work on a GPU (views and bare allocations left out).",
        "", markdown_table(table, COLUMNS)])
    write_tables(path, table_path, info, args, text, host=table)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "python -m benchmarks.host"))
