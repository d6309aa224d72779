"""FLOPs of the layer and of BAN's training step, counted on the ``meta`` device: any machine, seconds.

    python -m benchmarks.flops [--perm-optim-root PATH] [--out runs/benchmarks]
    python -m benchmarks.flops --tiny                    # the same on tiny sizes (tests)

What is counted: ``torch.utils.flop_counter.FlopCounterMode``'s FLOPs of the matrix products
(``mm``, ``bmm``, ``addmm``, ``baddbmm``, convolutions, attention) that a call dispatches, in
forward and in backward. Elementwise work (ReLU, exp, Sinkhorn's logsumexp, the LSTM's gate
nonlinearities, Adamax) is not counted. On ``meta`` tensors nothing is computed or allocated, so
the official BAN shape is counted in seconds; the count equals the count with data on the path
CUDA takes (``tests/test_devices.py``). The counts are a floor, not a time: a step whose matrix
products are a small share of its time is bound by launches, memory traffic or the host instead.

Layer table: the configurations of ``benchmarks.gpu``'s layer table (the VQA-configuration
encoder, paper appendix F.4: 13-d elements, pairwise MLP hidden 128, T = 3, LSTM 128, relevance
weights; B in {64, 256}, N in {36, 100, 400}), forward and forward + backward, for setperm (its
unrolled maths; the fused kernels compute the same products inside Triton, where the counter does
not see them), the literal reference of :mod:`benchmarks.reference` and, with
``--perm-optim-root``, the paper's released ``PermNet`` (imported from the user's checkout, as
``benchmarks.gpu`` does); setperm's rows split the count into the permutation optimisation (cost
and steps, counted alone) and the rest (permuting the elements, the LSTM); every row's ratio to setperm.

BAN table: forward + backward of plain BAN, BAN + LSTM and BAN + PO-U at the official shape
(batch 256, H = 1280, 8 glimpses, 2048-d features, 10-100 boxes per image: ``benchmarks.gpu``'s
random batches, the box counts given to the plugin as the training loop gives them), the mean
over ``--ban-batches`` batches; what the plugin adds to plain BAN and the ratio to it, the
step-time ratio there would be if the matrix products alone set the time.

Results: ``<out>/flops.json`` and ``flops.md`` (``flops_tiny.*`` with ``--tiny``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from integrations.common import ensure_new, run_command

from .gpu import (VQA_ANSWERS, _run, add_released_arguments, ban_shape, build_released, layer_configs,
                  random_batches, released_of)
from .harness import DEFAULT_OUT, build, markdown_table, prepare, write_tables

META = torch.device("meta")
BAN_VARIANTS = {"off": "BAN", "none": "BAN + LSTM", "po-u": "BAN + PO-U"}
LAYER_COLUMNS = [("config", "configuration"), ("impl", "implementation"), ("fwd_gflop", "fwd GFLOP"),
                 ("fb_gflop", "fwd+bwd GFLOP"), ("po_gflop", "of which PO (cost + steps)"),
                 ("rest_gflop", "of which permute + LSTM"), ("vs_setperm", "/ setperm"), ("note", "note")]
BAN_COLUMNS = [("model", "model"), ("fb_gflop", "fwd+bwd GFLOP (mean per batch)"),
               ("added_gflop", "added to plain BAN"), ("ratio", "/ plain BAN")]


def unavailable() -> Optional[str]:
    """Why this torch cannot count the layer's FLOPs on ``meta`` (None where it can): torch 2.0 has
    no FLOP counter, the counter of 2.1 - 2.3 fails on a product written with ``out=`` (the chunked
    kernel's), the meta backend of 2.0 - 2.2 lacks a kernel the layer uses. Found by counting a tiny
    encoder's forward and backward."""
    try:
        from torch.utils.flop_counter import FlopCounterMode  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FLOP counter (torch.utils.flop_counter: torch 2.1 and newer)"
    from setperm import PermutationOptimization, PermutationSetEncoder

    with torch.device("meta"):
        enc = PermutationSetEncoder(3, 4, PermutationOptimization(3, cost_hidden=4, steps=1))
        x = torch.ones(2, 5, 3, requires_grad=True)
    try:
        count_flops(lambda: enc(x).sum().backward())
    except (TypeError, NotImplementedError) as err:
        return f"torch {torch.__version__} cannot count the layer on the meta device: {str(err).splitlines()[0]}"
    return None


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of the matrix products ``fn()`` dispatches (forward, and backward where ``fn`` runs it)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def _po_alone(mod: nn.Module, x: torch.Tensor) -> None:
    """Forward + backward of the encoder's permutation optimisation by itself (the FLOPs of a
    backward do not depend on the upstream gradient's values)."""
    mod.po(x.detach().requires_grad_(True)).sum().backward()


def layer_rows(args, released) -> List[Dict[str, object]]:
    rows = []
    for cfg in layer_configs(args.tiny):
        impls = ["setperm", "reference"] + (["released PermNet"] if released is not None else [])
        base = None
        for impl in impls:
            row: Dict[str, object] = {"config": cfg.name, "impl": impl}
            if impl == "released PermNet":
                mod, inputs = build_released(released, cfg, args.released_features, META)
            else:
                mod, x, w = build(cfg, impl, device="meta")
                inputs = (x, w)
            is_released = impl.startswith("released")
            row["fwd_gflop"] = count_flops(lambda: _run(mod, inputs, "fwd", is_released)) / 1e9
            row["fb_gflop"] = count_flops(lambda: _run(mod, inputs, "fb", is_released)) / 1e9
            if impl == "setperm":
                base = row["fb_gflop"]
                row["po_gflop"] = count_flops(lambda: _po_alone(mod, inputs[0])) / 1e9
                row["rest_gflop"] = row["fb_gflop"] - row["po_gflop"]
            if is_released:
                row["note"] = f"includes its projection of {args.released_features}-d box features to 8"
            row["vs_setperm"] = row["fb_gflop"] / base
            rows.append(row)
            print(f"layer  {cfg.name:<18} {impl:<17} fwd+bwd {row['fb_gflop']:10.3f} GFLOP", flush=True)
    return rows


def ban_rows(args) -> List[Dict[str, object]]:
    from integrations.ban.model import build_ban
    from integrations.ban.plugin import patch_ban

    shape = ban_shape(args.tiny)
    batches = random_batches(shape, args.ban_batches, seed=args.seed)
    rows, base = [], None
    for variant, label in BAN_VARIANTS.items():
        with torch.device("meta"):
            ban = build_ban(shape["ntoken"], shape["answers"], v_dim=shape["v_dim"], num_hid=shape["num_hid"],
                            gamma=shape["gamma"])
            model = patch_ban(ban, permutation=variant).train()
        totals = []
        for batch in batches:
            v, b, q = (t.to(META) for t in (batch.v, batch.b, batch.q))
            extra = {} if variant == "off" else {"box_counts": batch.mask.sum(1).tolist()}

            def step():
                model(v, b, q, **extra)[0].sum().backward()
            totals.append(count_flops(step))
            model.zero_grad(set_to_none=True)
        row: Dict[str, object] = {"model": label, "fb_gflop": statistics.mean(totals) / 1e9,
                                  "per_batch_gflop": [t / 1e9 for t in totals]}
        base = base if base is not None else row["fb_gflop"]
        row["added_gflop"] = row["fb_gflop"] - base if variant != "off" else None
        row["ratio"] = row["fb_gflop"] / base
        rows.append(row)
        print(f"ban    {label:<12} fwd+bwd {row['fb_gflop']:10.1f} GFLOP  x{row['ratio']:.3f}", flush=True)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny layer and BAN sizes (tests)")
    add_released_arguments(p)
    p.add_argument("--ban-batches", type=int, default=4, help="random BAN batches counted (default 4, as benchmarks.gpu)")
    p.add_argument("--no-ban", action="store_true", help="skip the BAN table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default runs/benchmarks)")
    p.add_argument("--overwrite", action="store_true", help="replace this benchmark's earlier results in --out")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.ban_batches < 1:
        p.error(f"--ban-batches: expected an int >= 1, got {args.ban_batches}")
    released, error = released_of(args)
    error = error or unavailable()
    if error:
        print(f"benchmarks.flops: {error}", file=sys.stderr)
        return 1
    stem = "flops_tiny" if args.tiny else "flops"
    args.threads = torch.get_num_threads()            # nothing is computed: the threads do not matter
    path, info = prepare(args, f"{stem}.json", timed=False)       # counts, times nothing: no load warning
    table_path = ensure_new(args.out / f"{stem}.md", overwrite=args.overwrite)
    with warnings.catch_warnings():
        # the released module's own deprecated init calls; nothing of setperm's
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*xavier_uniform.*")
        layer = layer_rows(args, released)
        ban = [] if args.no_ban else ban_rows(args)
    shape = ban_shape(args.tiny)
    text = "\n".join(
        [f"FLOPs of the matrix products (torch's FlopCounterMode on the meta device, torch {torch.__version__}; "
         "elementwise work is not counted): `python -m benchmarks.flops" + (" --tiny" if args.tiny else "")
         + (" --perm-optim-root <perm-optim>" if released is not None else "") + "`", "",
         "Layer (VQA configuration: 13-d elements, pairwise hidden 128, T = 3, LSTM 128, relevance weights):", "",
         markdown_table(layer, LAYER_COLUMNS)]
        + ([] if not ban else
           ["", f"BAN training step, forward + backward (batch {shape['batch']}, H = {shape['num_hid']}, "
                f"{shape['gamma']} glimpses, {shape['min_boxes']}-{shape['max_boxes']} boxes per image, "
                f"{shape['answers'] if args.tiny else VQA_ANSWERS} answers; {args.ban_batches} random batches):", "",
            markdown_table(ban, BAN_COLUMNS)]))
    write_tables(path, table_path, info, args, text, layer=layer, ban=ban)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(main, "python -m benchmarks.flops"))
