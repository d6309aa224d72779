"""GPU benchmark: the permutation layer and BAN's training step on CUDA, in one command.

    python -m benchmarks.gpu [--perm-optim-root PATH] [--out runs/benchmarks]
    python -m benchmarks.gpu --device cpu --tiny        # dry run of every path on tiny sizes (tests)

Layer table: the VQA-configuration encoder (paper appendix F.4: 13-d elements, pairwise MLP hidden
128, T = 3, LSTM 128, relevance weights) on B in {64, 256} sets of N in {36, 100, 400} elements,
forward and forward + backward, for setperm with every kernel (``auto``, ``chunked``,
``compiled``, ``fused``) and with ``fused`` and the fused LSTM read (``read="fused"``,
:mod:`setperm.fused_read`); on CUDA also both ``fused`` layers replayed from CUDA graphs
(:func:`graphed_fb`: forward + backward recorded once, then each call a replay, so the time is
the GPU's alone, without the host's overhead between kernels, which the eager rows include where
the queue runs dry); the literal reference of :mod:`benchmarks.reference`, and, with
``--perm-optim-root``, the paper's released module: ``PermNet`` from ``ban-vqa/permnet.py`` of the
user's own checkout of github Cyanogenoid/perm-optim, imported from there (nothing of it is copied
here; it takes boxes, attention logits and box features, and includes its learned projection of
``--released-features``-d box features to 8; its copy of the optimisation runs T = 3 Sinkhorn
iterations per call where setperm and the reference run the paper's L = 4 of appendix B, a quarter
fewer, as the table's caption says). Time: CUDA events around each call, the median of
``--repeats`` calls after ``--warmup`` calls (the first of which compiles the fused kernels); beside it
the host's time to queue a call's forward + backward, the GPU idle at its start (the host's share, which
no GPU shortens, and which the CUDA-graph rows leave out). Memory:
``torch.cuda.max_memory_allocated`` during one call minus what was allocated before it (inputs,
parameters). The reference and the released module materialise every pair; they are skipped where
their estimated peak exceeds ``--ref-mem-limit-gb``.

Optimisation table: forward + backward of the permutation optimisation alone (T = 3, L = 4) on B in
{64, 256} padded sets of 10 to N in {36, 100} elements, on BAN + PO-U's 2,048 sets (256 questions
x 8 glimpses) of 10 to 100 boxes, and on 256 full sets of 100 with a mask (where a tile per set gains
nothing): the unrolled steps, ``setperm.fused``'s kernels as the default
runs them (each set in the smallest tile that holds it, one launch per tile size), and every set
in the tile of N (``per_set_tiles=False``) at the default warps per program and at half and twice
as many, and at the default warps with the cost matrix read where it is instead of from the
kernels' zero-padded copy (``stage_c=False``).

Readout table: forward + backward of the encoder's LSTM readout (13 -> 128) of padded sets of 10 to
N elements, (B, N) in {(64, 36), (256, 100), (2048, 100)}: a packed sequence with the set sizes from
the host, the same with the sizes copied from the device (a synchronisation), the padded read
that needs no sizes on the host (what the encoder takes on CUDA with ``mask=``), the fused read
(:mod:`setperm.fused_read`'s Triton kernels, sizes on the device); and, as the floor
of any read of N steps, the LSTM alone on the whole padded batch (beside the layer table's rows of
the same shapes, what of the layer's time and peak memory the LSTM takes).

BAN: the training-step time (forward, loss, backward, clip, Adamax) of plain BAN, BAN + LSTM and
BAN + PO-U (the unrolled steps, ``kernel="compiled"``, and ``kernel="fused"``, the default on CUDA; these
with the box counts from the host, as the training loop passes them, so that the LSTM reads a packed
sequence, and the fused one also with the counts left on the device, the padded read, and with the
fused LSTM read, ``read="fused"``, as BAN + LSTM also is) at the official shape (batch 256, H = 1280,
8 glimpses, 2048-d features of 10-100 boxes per image, VQA v2's 19,901-word dictionary and 3,129
answers), all built with the same seed
and timed on the same random batches in alternating order; medians and the ratios to plain BAN
(``--amp``: also both BAN + PO-U under bfloat16 autocast).

torch.compile table (last, the slowest to build): forward + backward of the whole encoder (kernels
``"compiled"``, the unrolled steps, and ``"fused"``, whose Triton kernels are then operators of the compiled graph) compiled
by the user's own ``torch.compile(encoder, mode=...)``, in inductor's default mode and in
``"reduce-overhead"`` (CUDA graphs: the whole call replayed as one graph, in memory reserved when it
was recorded, so no peak is reported there), at B = 256, N = 100; the first call's seconds
(compilation) beside the median. Each call starts without gradients (as a training step does).

The tables are measured in the order layer, BAN, optimisation, readout, torch.compile (the
layer's and BAN's figures first, should a run be stopped).

Results: ``<out>/gpu.json`` and ``<out>/gpu.md`` (``gpu_tiny.*`` with ``--tiny``), rewritten after each
row, so a run stopped part-way keeps the rows it finished. Without CUDA the
command exits with status 1 and one line; ``--device cpu`` runs the same code on the CPU (with
``--tiny``, in seconds), where peak memory is not measured.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from integrations.common import add_threads_argument, ensure_new, run_command
from integrations.common.atomic import atomic_write

from setperm.fused import MAX_SET_SIZE
from setperm.pairwise import KERNELS

from .harness import DEFAULT_OUT, Config, build, call, markdown_table, prepare, vqa, write_results

BAN_VARIANTS = ("off", "none", "none-read", "po-u", "po-u-fused", "po-u-fused-device", "po-u-fused-read")
BAN_LABELS = {"off": "BAN", "none": "BAN + LSTM", "none-read": "BAN + LSTM, read fused",
              "po-u": "BAN + PO-U, unrolled steps", "po-u-fused-read": "BAN + PO-U, kernel fused, read fused",
              "po-u-fused": "BAN + PO-U, kernel fused",
              "po-u-fused-device": "BAN + PO-U, kernel fused, box counts on the device (padded LSTM read)",
              "po-u-amp": "BAN + PO-U, unrolled steps, bf16 autocast", "po-u-fused-amp": "BAN + PO-U, kernel fused, bf16 autocast"}
# VQA v2 with the official preprocessing: dictionary size and answer candidates (ban-vqa's tools/)
VQA_NTOKEN, VQA_ANSWERS = 19901, 3129




# ------------------------------------------------------------------------------------------ timing
def time_call(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device,
              budget_s: Optional[float] = None, host: Optional[List[float]] = None) -> float:
    """Median seconds of up to ``repeats`` calls after up to ``warmup`` calls: CUDA events on CUDA
    (the time the GPU spends from the first to the last kernel a call queues, host overhead included
    when the queue runs dry), wall-clock time elsewhere. ``budget_s``: the warm-up stops after one
    call and the timed calls after three once that many seconds are spent on each (so that a slow
    implementation's row costs seconds, not minutes). ``host``: on CUDA, each timed call's host time
    is appended to it: the wall time until ``fn`` returns, the GPU idle at the start (the time the
    host takes to queue the call's work; all of the call's time where the call waits for the GPU)."""
    def spent(t0: float) -> bool:
        return budget_s is not None and time.perf_counter() - t0 > budget_s
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
        if spent(t0):
            break
    times = []
    t0 = time.perf_counter()
    while len(times) < repeats and not (len(times) >= 3 and spent(t0)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            begin = time.perf_counter()
            fn()
            if host is not None:
                host.append(time.perf_counter() - begin)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Bytes allocated at the peak of one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def measure(row: Dict[str, object], mode: str, fn: Callable[[], object], args, device: torch.device) -> None:
    """``row[mode + "_ms"]``: the median time of ``fn``; ``row[mode + "_host_ms"]``: on CUDA, the
    median time the host takes to queue it (:func:`time_call`); ``row[mode + "_mib"]``: its peak memory."""
    host: List[float] = []
    row[f"{mode}_ms"] = 1e3 * time_call(fn, args.warmup, args.repeats, device, args.budget_s, host=host)
    if host:
        row[f"{mode}_host_ms"] = 1e3 * statistics.median(host)
    peak = peak_memory(fn, device)
    row[f"{mode}_mib"] = None if peak is None else peak / 2 ** 20


def measured_fb(table: str, row: Dict[str, object], fn: Callable[[], object], args,
                device: torch.device) -> Dict[str, object]:
    """``row`` with the forward + backward ``fn`` timed (or the failure noted: one failing row must
    not lose the others), reported."""
    try:
        measure(row, "fb", fn, args, device)
    except Exception as err:
        failed(row, err, args)
    report(table, row)
    return row


def failed(row: Dict[str, object], err: Exception, args) -> None:
    """A failing row keeps the error's first line as its note (the other rows go on)."""
    row["note"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    if args.verbose:
        traceback.print_exc()


def report(table: str, row: Dict[str, object]) -> None:
    """One progress line per measured row on stderr (a log of a run stopped part-way has them)."""
    print(f"{table} {row['config']} | {row['impl']}: " + ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
        if k not in ("config", "impl")), file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ the paper's released module
def load_released_permnet(root) -> type:
    """``PermNet`` from ``<root>/ban-vqa/permnet.py`` of a checkout of github Cyanogenoid/perm-optim.

    Imported from the user's checkout (its folder first on ``sys.path`` during the import, so its
    ``permutation`` module comes along); every module it brings in under a bare name is removed from
    ``sys.modules`` again, and names it shadowed are restored.
    """
    if root is None or str(root) == "":
        raise ValueError("--perm-optim-root: expected the path of a checkout of github Cyanogenoid/perm-optim, "
                         "got an empty value")
    folder = Path(root).expanduser().resolve() / "ban-vqa"
    if not (folder / "permnet.py").is_file():
        raise ValueError(f"--perm-optim-root: {str(Path(root).expanduser())!r} is not a checkout of github "
                         "Cyanogenoid/perm-optim (no ban-vqa/permnet.py in it)")
    saved = dict(sys.modules)
    sys.path.insert(0, str(folder))
    try:
        module = importlib.import_module("permnet")
        released = getattr(module, "PermNet")
    except Exception as err:
        raise ValueError(f"--perm-optim-root: importing ban-vqa/permnet.py failed: {type(err).__name__}: {err}") from err
    finally:
        sys.path.remove(str(folder))
        for name in [n for n in sys.modules if n not in saved or sys.modules[n] is not saved[n]]:
            del sys.modules[name]
        sys.modules.update(saved)
    return released


def add_released_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--perm-optim-root", default=None,
                   help="checkout of github Cyanogenoid/perm-optim: adds the paper's released PermNet "
                        "(ban-vqa/permnet.py, imported from the checkout) to the layer table")
    p.add_argument("--released-features", type=int, default=2048,
                   help="box feature size given to the released PermNet (its projection to 8; default 2048 as in BAN)")


def released_of(args) -> Tuple[Optional[type], Optional[str]]:
    """``(PermNet, None)`` from ``--perm-optim-root``, ``(None, None)`` without it, ``(None, why)``
    where it is not a usable checkout."""
    if args.perm_optim_root is None:
        return None, None
    try:
        return load_released_permnet(args.perm_optim_root), None
    except ValueError as err:
        return None, str(err)


def build_released(released: type, cfg: Config, features: int, device: torch.device, seed: int = 0):
    """The released ``PermNet(objects, input_features, mid_features=8, output_features)`` (13-d
    elements: 4 box coordinates, the attention logit, 8 projected features) and its inputs:
    boxes ``(B, 4, N)``, attention logits ``(B, N)``, box features ``(B, N, features)``."""
    torch.manual_seed(seed)
    net = released(objects=10, input_features=features, mid_features=cfg.in_features - 5,
                   output_features=cfg.lstm_hidden).to(device)
    g = torch.Generator().manual_seed(seed)
    corner = torch.rand(cfg.batch, 2, cfg.n, generator=g)
    boxes = torch.cat([corner, corner + torch.rand(cfg.batch, 2, cfg.n, generator=g)], 1).to(device)
    att = torch.randn(cfg.batch, cfg.n, generator=g).to(device)
    feats = torch.rand(cfg.batch, cfg.n, features, generator=g).to(device)
    return net, (boxes, att, feats)


def released_bytes(cfg: Config, features: int) -> float:
    """Rough fwd+bwd peak of the released module: the reference's pairs and MLP activations on both
    orders (it materialises them the same way) plus its box features."""
    return cfg.estimate_reference_bytes() + 8.0 * cfg.batch * cfg.n * features


# ------------------------------------------------------------------------------------ layer table
def layer_configs(tiny: bool) -> List[Config]:
    if tiny:
        return [Config("tiny vqa B=3 N=6", "encoder", 13, 8, 2, 6, 3, lstm_hidden=7),
                Config("tiny vqa B=2 N=9", "encoder", 13, 8, 2, 9, 2, lstm_hidden=7)]
    return [vqa(n, b) for b in (64, 256) for n in (36, 100, 400)]


def _setperm(cfg: Config, kernel: str, device: torch.device, read: str = "auto"):
    mod, x, w = build(cfg, "setperm", device=str(device))
    mod.po.cost.kernel = kernel
    mod.read = read
    return mod, (x, w)


def _run(mod: nn.Module, inputs, mode: str, released: bool) -> None:
    def forward(args):
        return mod(*args) if released else call(mod, *args)
    if mode == "fwd":
        with torch.no_grad():
            forward(inputs)
        return
    args = list(inputs)
    args[0] = args[0].detach().requires_grad_(True)
    out = forward(args)
    (out[0] if isinstance(out, tuple) else out).sum().backward()


# the fused kernels and the fused LSTM read (setperm.fused_read) together
FUSED_READ_LABEL = "setperm (fused, read fused)"
# the same layers replayed from CUDA graphs (graphed_fb): the time without the host's share
GRAPH_SUFFIX = ", CUDA graph"


class _Positional(nn.Module):
    """The encoder called as ``encoder(x, weights=w)`` with positional arguments only (what
    ``torch.cuda.make_graphed_callables`` passes)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x, w):
        return call(self.encoder, x, w)


def graphed_fb(mod: nn.Module, inputs, warmup: int = 3) -> Callable[[], None]:
    """forward + backward of the encoder ``mod`` on ``inputs = (x, w)`` as ``_run`` does it, with the
    encoder's forward and backward replayed from CUDA graphs recorded once
    (``torch.cuda.make_graphed_callables``, after ``warmup`` calls on a side stream, which also
    compile the kernels): each call copies its input into the graphs' static input and replays them,
    so the time is what the GPU takes with no host overhead between the kernels (the loss's sum and
    the parameters' gradient accumulation run outside the graphs). Recording fails on an operation
    that synchronises with the host or copies host memory to the device."""
    x, w = inputs
    graphed = torch.cuda.make_graphed_callables(_Positional(mod), (x.detach().requires_grad_(True), w),
                                                num_warmup_iters=warmup, allow_unused_input=True)

    def fb() -> None:
        graphed(x.detach().requires_grad_(True), w).sum().backward()
    return fb


def layer_rows(args, device: torch.device, released: Optional[type]) -> Iterator[Dict[str, object]]:
    limit = args.ref_mem_limit_gb * 2 ** 30
    for cfg in layer_configs(args.tiny):
        impls = [(f"setperm ({k})", k) for k in args.kernels]
        if "fused" in args.kernels:
            impls.append((FUSED_READ_LABEL, "fused"))
            if device.type == "cuda":
                impls += [(label + GRAPH_SUFFIX, "fused") for label in ("setperm (fused)", FUSED_READ_LABEL)]
        impls.append(("reference", None))
        if released is not None:
            impls.append(("released PermNet", None))
        base_ms = None
        for label, kernel in impls:
            row: Dict[str, object] = {"config": cfg.name, "impl": label}
            estimate = (released_bytes(cfg, args.released_features) if label.startswith("released")
                        else cfg.estimate_reference_bytes() if label == "reference" else 0)
            if estimate > limit:
                row["note"] = f"skipped: estimated peak {estimate / 2 ** 30:.0f} GiB > --ref-mem-limit-gb"
                yield row
                continue
            try:
                if kernel is not None:
                    read = "fused" if label.startswith(FUSED_READ_LABEL) else "auto"
                    mod, inputs = _setperm(cfg, kernel, device, read=read)
                elif label == "reference":
                    mod, x, w = build(cfg, "reference", device=str(device))
                    inputs = (x, w)
                else:
                    mod, inputs = build_released(released, cfg, args.released_features, device)
                is_released = label.startswith("released")
                if label.endswith(GRAPH_SUFFIX):
                    # forward + backward only (the graphs are recorded for training), no peak: a replay
                    # runs in memory reserved when the graphs were recorded
                    measure(row, "fb", graphed_fb(mod, inputs), args, device)
                    row["fb_mib"] = None
                    row["note"] = "peak not measured: CUDA graphs replay in memory reserved when recorded"
                else:
                    for mode in ("fwd", "fb"):
                        measure(row, mode, lambda: _run(mod, inputs, mode, is_released), args, device)
                del mod, inputs
                if kernel == "fused" and cfg.n > MAX_SET_SIZE:
                    row["note"] = "; ".join(filter(None, (f"N > {MAX_SET_SIZE}: the unrolled steps (as compiled)",
                                                          row.get("note"))))
            except torch.cuda.OutOfMemoryError:
                # (torch.cuda's name: torch.OutOfMemoryError, the same class, is torch 2.5 and newer)
                row["note"] = "out of memory"
            except Exception as err:                         # one failing row must not lose the others
                failed(row, err, args)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if label == "setperm (auto)" and row.get("fb_ms"):
                base_ms = row["fb_ms"]
            if base_ms and row.get("fb_ms"):
                row["fb_vs_auto"] = row["fb_ms"] / base_ms
            report("layer", row)
            yield row


LAYER_COLUMNS = [("config", "configuration"), ("impl", "implementation"), ("fwd_ms", "fwd ms"),
                 ("fb_ms", "fwd+bwd ms"), ("fb_host_ms", "fwd+bwd host ms"), ("fwd_mib", "fwd peak MiB"),
                 ("fb_mib", "fwd+bwd peak MiB"),
                 ("fb_vs_auto", "fwd+bwd time / setperm (auto)"), ("note", "note")]


# ---------------------------------------------------------------------- the optimisation alone
def optimizer_configs(tiny: bool):
    """(sets B, size N, smallest set) of the optimisation-alone table: VQA's 10-100 boxes padded."""
    if tiny:
        return [(3, 6, 2), (2, 9, 3)]
    # and 2048 sets of up to 100: BAN + PO-U's batch (256 questions x 8 glimpses in one call); and
    # 256 full sets, masked: where a tile per set gains nothing, what its extra launches cost
    return [(b, n, min(10, n)) for b in (64, 256) for n in (36, 100)] + [(2048, 100, 10), (256, 100, 100)]


def optimizer_rows(args, device: torch.device) -> Iterator[Dict[str, object]]:
    """fwd+bwd of the permutation optimisation alone (T = 3, L = 4, padded sets): the unrolled steps
    against setperm.fused's kernels as the default runs them (each set in the smallest tile that
    holds it), and every set in the tile of N (per_set_tiles=False) at the default warps and at half
    and twice as many, and with the cost read in place (stage_c=False), so that one run shows how
    these choices (the kernel, its tiles, its warps, where its products read the cost) fare on the card."""
    from setperm import fused
    from setperm.functional import optimize_permutation

    for B, N, smallest in optimizer_configs(args.tiny):
        g = torch.Generator().manual_seed(args.seed)
        C = torch.randn(B, N, N, generator=g)
        sizes = torch.randint(smallest, N + 1, (B,), generator=g)
        sizes[0] = N
        mask = torch.arange(N) < sizes[:, None]
        C = (C - C.transpose(1, 2)) * (mask[:, :, None] & mask[:, None, :])
        C = (C / C.norm(dim=(1, 2), keepdim=True).clamp_min(1e-12)).to(device)
        mask, up = mask.to(device), torch.randn(B, N, N, generator=g).to(device)
        eta = torch.ones((), device=device, requires_grad=True)
        default = fused._warps(fused._block(N))
        warps = [w for w in (default // 2, default, default * 2) if 1 <= w <= 32]
        one = f"fused, every set in a {fused._block(N)} tile"
        # (label, kernel: None for the unrolled steps, else (warps, stage_c, per_set_tiles))
        impls = ([("unrolled", None), ("fused, a tile per set", (None, True, True))]
                 + [(f"{one}, {w} warp{'s' if w > 1 else ''}", (w, True, False)) for w in warps]
                 + [(f"{one}, {default} warps, C read in place (stage_c=False)", (default, False, False))])
        for label, setting in impls:
            row: Dict[str, object] = {"config": f"B={B} N={N}" + (", every set full" if smallest == N else ""),
                                      "impl": label}
            if setting is not None and not fused.applies(C, 3):
                row["note"] = f"the fused kernels do not run on {device.type} here"
                yield row
                continue
            if setting == (None, True, True):
                row["note"] = "kernel='fused' default"

            def fb(setting=setting):
                Cg = C.detach().requires_grad_(True)
                if setting is None:
                    P = optimize_permutation(Cg, mask=mask, eta=eta, steps=3, kernel="chunked")
                else:
                    warps, stage_c, per_set_tiles = setting
                    P = fused.fused_optimize((2 * eta) * Cg, None, mask, steps=3, sinkhorn_iters=4,
                                             temperature=1.0, num_warps=warps, stage_c=stage_c,
                                             per_set_tiles=per_set_tiles)
                (P * up).sum().backward()
            yield measured_fb("optimisation", row, fb, args, device)


OPTIMIZER_COLUMNS = [("config", "sets"), ("impl", "implementation"), ("fb_ms", "fwd+bwd ms"),
                     ("fb_mib", "fwd+bwd peak MiB"), ("note", "note")]


# ------------------------------------------------------------------------------ the LSTM readout
def readout_configs(tiny: bool):
    """(sets B, size N, smallest set) of the readout table: the encoder's LSTM (13 -> 128) over VQA's
    10-100 boxes, two layer-table shapes (the smallest, where the released module's memory is least
    above setperm's, and B = 256, N = 100) and BAN + PO-U's (256 questions x 8 glimpses)."""
    return [(3, 6, 2)] if tiny else [(64, 36, 10), (256, 100, 10), (2048, 100, 10)]


def readout_rows(args, device: torch.device) -> Iterator[Dict[str, object]]:
    """fwd+bwd of the encoder's LSTM readout (``setperm.encoder.last_state``) of padded sets: a
    packed sequence with the sizes from the host (``lengths=`` on the CPU, as BAN passes them), the
    same with the sizes on the device (copied to the host: a synchronisation), the padded read
    that needs none (what ``mask=`` takes on CUDA), and the fused read (``setperm.fused_read``'s
    kernels, sizes on the device)."""
    from setperm.encoder import last_state

    for B, N, smallest in readout_configs(args.tiny):
        torch.manual_seed(args.seed)
        lstm = nn.LSTM(13, 7 if args.tiny else 128, batch_first=True).to(device)
        g = torch.Generator().manual_seed(args.seed)
        sizes = torch.randint(smallest, N + 1, (B,), generator=g)
        seq = torch.randn(B, N, 13, generator=g).to(device)
        up = torch.randn(B, lstm.hidden_size, generator=g).to(device)
        sizes_d = sizes.to(device)
        impls = [("packed, sizes from the host", "packed", sizes),
                 ("packed, sizes copied from the device", "packed", None),
                 ("padded, sizes on the device (mask=)", "padded", None),
                 ("fused (Triton), sizes on the device", "fused", None)]
        for label, method, host in impls:
            row: Dict[str, object] = {"config": f"B={B} N={N}", "impl": label}

            def fb(method=method, host=host):
                (last_state(lstm, seq.detach().requires_grad_(True), sizes_d, method=method,
                            host_lengths=host) * up).sum().backward()
            yield measured_fb("readout", row, fb, args, device)
        # what any read of N steps costs at least: the LSTM on the whole batch, its final cell state
        row = {"config": f"B={B} N={N}", "impl": "the LSTM alone on all N steps (no sizes: the floor)"}

        def floor():
            (lstm(seq.detach().requires_grad_(True))[1][1][0] * up).sum().backward()
        yield measured_fb("readout", row, floor, args, device)


# ------------------------------------------------------------------- the whole encoder compiled
COMPILE_MODES = ("default", "reduce-overhead")
# every mode --compile-modes takes (torch.compile's own)
COMPILE_MODES_KNOWN = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_KERNELS = ("compiled", "fused")
# the modes whose compiled graphs run as CUDA graphs on CUDA
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def mark_step_begin() -> None:
    """A new training iteration for CUDA graphs' memory pool (``mode="reduce-overhead"``); a no-op
    outside CUDA graphs. (torch 2.1 and 2.2 have it in inductor only; 2.0's CUDA graphs need none.)"""
    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if mark is None:
        try:
            mark = importlib.import_module("torch._inductor").cudagraph_mark_step_begin
        except (ImportError, AttributeError, RuntimeError):
            return
    mark()


def reset_compiler() -> None:
    """Forget every compiled graph (between rows, so that none reuses another's), where torch.compile
    runs at all (torch 2.0 on Python 3.11 cannot import dynamo: the row then records why)."""
    try:
        import torch._dynamo
    except (ImportError, RuntimeError):
        return
    torch._dynamo.reset()


def compile_rows(args, device: torch.device) -> Iterator[Dict[str, object]]:
    """fwd+bwd of the whole encoder under ``torch.compile(encoder, mode=m)`` for each of
    ``--compile-modes`` and each of ``--compile-kernels`` (``"fused"``: its Triton kernels are
    operators of the compiled graph): the first call's seconds (tracing and compiling) and the
    median after it."""
    cfg = layer_configs(args.tiny)[0] if args.tiny else vqa(100, 256)
    for mode in args.compile_modes:
        for kernel in args.compile_kernels:
            row: Dict[str, object] = {"config": cfg.name, "impl": f"torch.compile(encoder, mode={mode!r})",
                                      "kernel": kernel}
            reset_compiler()
            try:
                mod, (x, w) = _setperm(cfg, kernel, device)
                compiled = torch.compile(mod, mode=mode, dynamic=False)

                def fb():
                    mark_step_begin()
                    # the gradients set, not added: under CUDA graphs the previous call's gradients
                    # lie in the graphs' memory pool, which this call's replay overwrites (adding to
                    # them fails: "accessing tensor output of CUDAGraphs that has been overwritten")
                    mod.zero_grad(set_to_none=True)
                    call(compiled, x.detach().requires_grad_(True), w).sum().backward()
                row["first_call_s"] = time_call(fb, 0, 1, device)
                measure(row, "fb", fb, args, device)
                if device.type == "cuda" and mode in CUDA_GRAPH_MODES:
                    # a replay allocates nothing: its memory was reserved in the graphs' pool when they
                    # were recorded, so the allocator's peak does not show it
                    row["fb_mib"] = None
                    row["note"] = "peak not measured: CUDA graphs replay in memory reserved when recorded"
                del mod, compiled, x, w
            except Exception as err:                         # one failing row must not lose the others
                failed(row, err, args)
            reset_compiler()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            report("compile", row)
            yield row


COMPILE_COLUMNS = [("config", "configuration"), ("impl", "implementation"), ("kernel", "kernel"),
                   ("first_call_s", "first call s"),
                   ("fb_ms", "fwd+bwd ms"), ("fb_mib", "fwd+bwd peak MiB"), ("note", "note")]


# --------------------------------------------------------------------------------- BAN training step
def ban_shape(tiny: bool) -> Dict[str, int]:
    if tiny:
        return {"batch": 4, "num_hid": 16, "gamma": 2, "v_dim": 32, "min_boxes": 3, "max_boxes": 8,
                "ntoken": 50, "answers": 20}
    return {"batch": 256, "num_hid": 1280, "gamma": 8, "v_dim": 2048, "min_boxes": 10, "max_boxes": 100,
            "ntoken": VQA_NTOKEN, "answers": VQA_ANSWERS}


def random_batches(shape: Dict[str, int], count: int, seed: int = 0) -> list:
    """``count`` VQA batches of the official layout (:class:`integrations.ban.data.VQABatch`): box
    counts drawn from ``[min_boxes, max_boxes]`` per image, zero-padded to the batch's largest,
    normalised box corners, 14 question tokens, sparse soft answer scores."""
    from integrations.ban.data import VQABatch

    g = torch.Generator().manual_seed(seed)
    B, out = shape["batch"], []
    for _ in range(count):
        n = torch.randint(shape["min_boxes"], shape["max_boxes"] + 1, (B,), generator=g)
        K = int(n.max())
        mask = torch.arange(K) < n[:, None]
        v = torch.rand(B, K, shape["v_dim"], generator=g) * mask[..., None]
        corner = torch.rand(B, K, 2, generator=g) * 0.5
        size = torch.rand(B, K, 2, generator=g) * 0.5
        b = torch.cat([corner, corner + size, size], -1) * mask[..., None]
        q = torch.randint(0, shape["ntoken"], (B, 14), generator=g)
        target = torch.zeros(B, shape["answers"])
        target[torch.arange(B), torch.randint(0, shape["answers"], (B,), generator=g)] = 1.0
        out.append(VQABatch(v, b, q, target, mask, torch.arange(B)))
    return out


class _CountsOnDevice(nn.Module):
    """A patched BAN called without the box counts the training loop passes from the host: its set
    encoder then takes the sizes from the padding mask on the device and reads the LSTM padded (the
    other BAN + PO-U rows read it packed, with the host's counts)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module          # (train_step's model_inputs looks for the patched model here, as under DDP)

    def forward(self, *args, box_counts=None, **kwargs):
        return self.module(*args, **kwargs)


def ban_rows(args, device: torch.device) -> List[Dict[str, object]]:
    """Median training-step seconds of plain BAN, BAN + LSTM, BAN + PO-U (same seed, same batches,
    alternating order) and their ratios to plain BAN."""
    from integrations.ban.model import build_ban
    from integrations.ban.plugin import patch_ban
    from integrations.ban.train import train_step

    shape = ban_shape(args.tiny)
    variants = list(BAN_VARIANTS) + (["po-u-amp", "po-u-fused-amp"] if args.amp else [])
    models, optims = {}, {}
    # variant -> the row of a model that failed (one failing model must not lose the others' rows)
    failures: Dict[str, Dict[str, object]] = {}

    def fail(variant: str, err: Exception) -> None:
        failures[variant] = {"model": BAN_LABELS[variant]}
        failed(failures[variant], err, args)
        models.pop(variant, None)
        optims.pop(variant, None)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for variant in variants:
        torch.manual_seed(args.seed)
        try:
            ban = build_ban(shape["ntoken"], shape["answers"], v_dim=shape["v_dim"], num_hid=shape["num_hid"],
                            gamma=shape["gamma"])
            perm = variant.replace("-amp", "").replace("-fused", "").replace("-device", "").replace("-read", "")
            read = "fused" if variant.endswith("-read") else "auto"
            model = (patch_ban(ban, permutation=perm) if perm == "off" else
                     patch_ban(ban, permutation=perm, kernel="fused" if "-fused" in variant else "compiled", read=read))
            if variant.endswith("-device"):
                model = _CountsOnDevice(model)
            models[variant] = model.to(device)
            optims[variant] = torch.optim.Adamax([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        except Exception as err:
            fail(variant, err)
    batches = random_batches(shape, args.ban_batches, seed=args.seed)
    if device.type == "cuda":            # as the training loader gives them: page-locked, copied asynchronously
        batches = [type(bt)(*(t.pin_memory() for t in bt)) for bt in batches]
    times: Dict[str, List[float]] = {v: [] for v in variants}
    for k, batch in enumerate(itertools.islice(itertools.cycle(batches), args.ban_steps + args.warmup)):
        order = variants if k % 2 == 0 else variants[::-1]
        for variant in order:
            if variant in failures:
                continue
            step = lambda: train_step(models[variant], optims[variant], batch, device, 0.25,     # noqa: E731
                                      amp=variant.endswith("-amp"))
            try:
                seconds = time_call(step, 0, 1, device)
            except Exception as err:
                fail(variant, err)
                continue
            if k >= args.warmup:                          # the first steps compile and warm the caches
                times[variant].append(seconds)
    base = statistics.median(times["off"]) if times["off"] and "off" not in failures else None
    rows = []
    for variant in variants:
        if variant in failures or not times[variant]:
            rows.append({**failures.get(variant, {"model": BAN_LABELS[variant]}), "steps": len(times[variant])})
            continue
        med = statistics.median(times[variant])
        rows.append({"model": BAN_LABELS[variant], "step_ms": 1e3 * med, "ratio": None if base is None else med / base,
                     "steps": len(times[variant])})
    for name, row in zip(variants, rows):
        row["per_step_ms"] = [1e3 * t for t in times[name]]
    return rows


BAN_COLUMNS = [("model", "model"), ("step_ms", "training step ms (median)"), ("ratio", "/ plain BAN"),
               ("steps", "timed steps"), ("note", "note")]


# ------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:<i>, or cpu for a dry run")
    p.add_argument("--tiny", action="store_true", help="tiny layer and BAN sizes (a dry run of every path)")
    add_released_arguments(p)
    p.add_argument("--kernels", default=",".join(KERNELS),
                   help=f"setperm kernels in the layer table, comma-separated (default {','.join(KERNELS)})")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls / steps first (compilation, caches)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per layer measurement; the median is kept")
    p.add_argument("--budget-s", type=float, default=3.0,
                   help="seconds per layer / optimisation measurement: after that, one warm-up call and at "
                        "least 3 timed calls are enough (default 3)")
    p.add_argument("--ban-steps", type=int, default=20, help="timed training steps per BAN model")
    p.add_argument("--ban-batches", type=int, default=4, help="distinct random batches cycled through")
    p.add_argument("--amp", action="store_true", help="also time both BAN + PO-U under bfloat16 autocast")
    p.add_argument("--no-layer", action="store_true", help="skip the layer table")
    p.add_argument("--no-optimizer", action="store_true",
                   help="skip the table of the permutation optimisation alone (unrolled vs fused, warps)")
    p.add_argument("--no-ban", action="store_true", help="skip the BAN training steps")
    p.add_argument("--no-readout", action="store_true", help="skip the LSTM readout table")
    p.add_argument("--compile-modes", default=",".join(COMPILE_MODES),
                   help="torch.compile modes of the whole-encoder table, comma-separated, or '' to skip it "
                        f"(default {','.join(COMPILE_MODES)})")
    p.add_argument("--compile-kernels", default=",".join(COMPILE_KERNELS),
                   help=f"setperm kernels of the whole-encoder torch.compile table, comma-separated "
                        f"(default {','.join(COMPILE_KERNELS)})")
    p.add_argument("--ref-mem-limit-gb", type=float, default=64.0,
                   help="skip the reference / released module where its estimated peak exceeds this (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default runs/benchmarks)")
    p.add_argument("--overwrite", action="store_true", help="replace this benchmark's earlier results in --out")
    add_threads_argument(p)
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failing row")
    return p


def comma_subset(p: argparse.ArgumentParser, flag: str, text: str, allowed, allow_empty: bool = False) -> List[str]:
    """The comma-separated values of ``flag``, each one of ``allowed`` (a parser error otherwise)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    if any(v not in allowed for v in values) or not (values or allow_empty):
        empty = " (or empty)" if allow_empty else ""
        p.error(f"{flag}: expected a comma-separated subset of {','.join(allowed)}{empty}, got {text!r}")
    return values


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        p.error(f"--device: unknown device {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.gpu: CUDA is required and no CUDA device is available (--device cpu --tiny runs a "
              "dry run on the CPU)", file=sys.stderr)
        return 1
    if device.type not in ("cuda", "cpu"):
        p.error(f"--device: expected cuda[:i] or cpu, got {args.device!r}")
    args.kernels = comma_subset(p, "--kernels", args.kernels, KERNELS)
    args.compile_kernels = comma_subset(p, "--compile-kernels", args.compile_kernels, KERNELS)
    args.compile_modes = comma_subset(p, "--compile-modes", args.compile_modes, COMPILE_MODES_KNOWN, allow_empty=True)
    released, error = released_of(args)
    if error:
        print(f"benchmarks.gpu: {error}", file=sys.stderr)
        return 1
    stem = "gpu_tiny" if args.tiny else "gpu"
    path, info = prepare(args, f"{stem}.json")
    table_path = ensure_new(args.out / f"{stem}.md", overwrite=args.overwrite)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    results: Dict[str, list] = {"layer": [], "optimizer": [], "readout": [], "ban": [], "compile": []}
    sections = [("layer", not args.no_layer, lambda: layer_rows(args, device, released)),
                ("ban", not args.no_ban, lambda: ban_rows(args, device)),
                ("optimizer", not args.no_optimizer, lambda: optimizer_rows(args, device)),
                ("readout", not args.no_readout, lambda: readout_rows(args, device)),
                ("compile", bool(args.compile_modes), lambda: compile_rows(args, device))]
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext(), \
            warnings.catch_warnings(record=True) as caught:
        for name, wanted, rows in sections:
            if wanted:
                for row in rows():
                    results[name].append(row)
                    # written after every row: a run stopped part-way keeps what it finished
                    text = save_results(path, table_path, info, args, results, caught)
    for w in caught:                     # shown as usual; setperm's own are with the results
        if not str(w.message).startswith("setperm"):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if not any(results.values()):
        text = save_results(path, table_path, info, args, results, caught)
    print(text)
    print(f"results: {path}")
    return 0


def save_results(path: Path, table_path: Path, info: Dict[str, object], args, results: Dict[str, list],
                 caught: list) -> str:
    """Write the JSON and the markdown tables of what was measured so far; returns the markdown."""
    # setperm warns when a kernel falls back (the rows it touched did not time that kernel)
    fallbacks = sorted({str(w.message) for w in caught if str(w.message).startswith("setperm")})
    tables = []
    if results["layer"]:
        released = any(r["impl"].startswith("released") for r in results["layer"])
        tables += ["Layer (VQA configuration: 13-d elements, pairwise hidden 128, T = 3, LSTM 128, relevance "
                   "weights" + ("; Sinkhorn iterations per call: setperm and the reference 4 (L of appendix B), "
                                "the released PermNet 3 (its ban-vqa code passes T)" if released else "") + "):",
                   "", markdown_table(results["layer"], LAYER_COLUMNS)]
    if results["optimizer"]:
        tables += ["", "The permutation optimisation alone (T = 3, L = 4, padded sets of 10-N elements, float32):", "",
                   markdown_table(results["optimizer"], OPTIMIZER_COLUMNS)]
    if results["readout"]:
        tables += ["", "The encoder's LSTM readout (13 -> 128, padded sets of 10-N elements, float32):", "",
                   markdown_table(results["readout"], OPTIMIZER_COLUMNS)]
    if results["ban"]:
        shape = ban_shape(args.tiny)
        tables += ["", f"BAN training step (batch {shape['batch']}, H {shape['num_hid']}, {shape['gamma']} glimpses, "
                       f"{shape['min_boxes']}-{shape['max_boxes']} boxes):", "",
                   markdown_table(results["ban"], BAN_COLUMNS)]
    if results["compile"]:
        tables += ["", "The whole encoder under torch.compile:", "",
                   markdown_table(results["compile"], COMPILE_COLUMNS)]
    if fallbacks:
        tables += ["", "Fallbacks during the run (rows of these kernels timed their fallback instead):", ""]
        tables += [f"- {message}" for message in fallbacks]
    text = "\n".join(tables).strip("\n")
    write_results(path, dict(info), args, **results, fallbacks=fallbacks, table=text)
    atomic_write(table_path, lambda f: f.write((text + "\n").encode()), durable=False)
    return text


if __name__ == "__main__":
    sys.exit(run_command(main, "python -m benchmarks.gpu"))
