"""Training-step time of BAN + PO (or BAN + LSTM) against plain BAN, and where the patched step spends it.

    python -m benchmarks.ban_step_time --data-root runs/ban/synth --permutation po-u --num-hid 128 --gamma 2 \\
        --batch-size 32 --bucket --steps 20 --threads 1

Whole steps: both models are built with the same seed and trained on the same batches, alternating
which one goes first after two warm-up steps; the medians of ``--steps`` full training steps
(forward, backward, clip, Adamax), their ratio, the per-batch ratios (mean +- std) and a Wilcoxon
signed-rank test of the paired step times are printed and written to ``--out`` (JSON). Wall-clock
and process CPU time are both kept: on a machine busy with other work the CPU time of a one-thread
run is the steadier of the two.

Breakdown (``--breakdown``, on by default): one batch of the comparison (the one with the median
box count K) goes once through a step-by-step replay of ``PatchedBan.forward`` (:func:`staged_forward`,
built from the same functional core, ``ban_attend`` / ``glimpse_sets`` / the glimpse loop of
``ban_fuse``; forward hooks on the set encoder's optimiser, pairwise cost and LSTM record their
exact inputs), which keeps the input of every part of a training step. Each part is then timed
alone: forward + backward with an upstream gradient of ones, its inputs detached (leaves that
require a gradient exactly where the real step computes one), parameter gradients cleared before
each call. Every timed round runs one whole training step of the patched model on the same batch,
then the optimiser step on its gradients, then every part once, so the load of a busy machine
falls on all of them alike; medians over ``--steps`` rounds after one warm-up round.

Parts (BAN's): word embedding, question GRU, bilinear attention (the G maps), the glimpse loop's
``b_net`` + ``q_prj``, the counter (G calls, with its max-over-words relevance), ``c_prj``,
classifier + loss; the optimiser step (grad-norm clip + Adamax over all parameters). The set
encoder's (appendix F.4): the set construction (``box_proj`` + ``glimpse_sets``), the pairwise cost
(eq. 8-10), the inner steps (algorithm 1: T unrolled gradient steps with Sinkhorn), permute
(relevance weighting, ``P^T x``), the LSTM over the K boxes (as the encoder reads them:
``setperm.encoder.last_state``), ``p_prj``. "The rest"
is the step minus the sum of the parts (residual adds, ``zero_grad``, autograd bookkeeping). The
whole set encoder is timed too, as a check of its four pieces (not counted in the sum).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from integrations.ban.cli import add_train_arguments, resolve_train_args
from integrations.ban.model import padding_mask
from integrations.ban.plugin import PatchedBan, glimpse_sets
from integrations.ban.train import (box_counts, build_model, datasets, make_loader, min_boxes, train_step,
                                   vqa_bce_loss)
from integrations.common import ensure_new, positive_int, resolve_device, run_command, seed_everything, write_json
from setperm.functional import apply_permutation, optimize_permutation
from setperm.encoder import last_state
from setperm.masking import zero_padding

# (name, group) of every part, in the order of the forward pass; "check" rows are not summed
BAN_PARTS = ("word embedding", "question GRU", "bilinear attention", "b_net + q_prj (glimpse loop)", "counter",
             "c_prj", "classifier + loss")
ENCODER_PARTS = ("set construction (box_proj + glimpse_sets)", "pairwise cost", "inner steps (descent + Sinkhorn)",
                 "permute", "LSTM over K boxes", "p_prj")
OPTIMISER_PART = "clip + Adamax"
ENCODER_WHOLE = "set encoder (whole, check)"
ENCODER_PIECES = ("pairwise cost", "inner steps (descent + Sinkhorn)", "permute", "LSTM over K boxes")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(values: Sequence[float]) -> Dict[str, float]:
    """Median, mean and (sample) std of seconds; std 0 for a single value."""
    return {"median": statistics.median(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _paired_test(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    """Two-sided Wilcoxon signed-rank p-value of the paired differences ``b - a`` (None if undefined)."""
    from scipy.stats import wilcoxon

    if len(a) < 2 or all(x == y for x, y in zip(a, b)):
        return None
    try:
        return float(wilcoxon(b, a).pvalue)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# whole steps
# ---------------------------------------------------------------------------------------------

def build_pair(args) -> Tuple[torch.device, Dict[str, nn.Module], Dict[str, torch.optim.Optimizer], object]:
    """Plain BAN (``"off"``) and ``args.permutation`` built with the same seed, their Adamax, the loader."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dictionary, train_ds, _, ref = datasets(args)
    models, optims = {}, {}
    for variant in ("off", args.permutation):
        seed_everything(args.seed)
        m = build_model(argparse.Namespace(**{**vars(args), "permutation": variant}), dictionary.ntoken,
                        ref.num_ans_candidates, ref.v_dim).to(device)
        models[variant] = m
        optims[variant] = torch.optim.Adamax([p for p in m.parameters() if p.requires_grad], lr=args.lr)
    loader = make_loader(train_ds, args.batch_size, shuffle=True, epoch=0, seed=args.seed, rank=0, world=1,
                         counts=box_counts(train_ds) if args.bucket else None, min_boxes=min_boxes(args))
    return device, models, optims, loader


def compare_step_time(args, pair=None, batches: Optional[List] = None) -> dict:
    """Median seconds per training step of ``args.permutation`` vs plain BAN (``off``).

    ``pair``: the result of :func:`build_pair` (built here if None). ``batches``, if given, is
    filled with the timed batches (for the breakdown).
    """
    device, models, optims, loader = pair if pair is not None else build_pair(args)
    times = {m: [] for m in models}
    cpu = {m: [] for m in models}
    for k, batch in enumerate(itertools.islice(itertools.cycle(loader), args.steps + 2)):
        for variant in (models if k % 2 == 0 else list(models)[::-1]):  # alternate the order
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            train_step(models[variant], optims[variant], batch, device, args.grad_clip)
            _sync(device)
            if k >= 2:  # two warm-up steps
                times[variant].append(time.perf_counter() - t0)
                cpu[variant].append(time.process_time() - c0)
        if k >= 2 and batches is not None:
            batches.append(batch)
    med = {m: statistics.median(t) for m, t in times.items()}
    cpu_med = {m: statistics.median(t) for m, t in cpu.items()}
    variant = args.permutation
    per_batch = [x / y for x, y in zip(times[variant], times["off"])]
    per_batch_cpu = [x / y for x, y in zip(cpu[variant], cpu["off"])]
    return {"median_s": med, "ratio": med[variant] / med["off"], "steps": len(times["off"]),
            "threads": torch.get_num_threads(), "batch_size": args.batch_size, "num_hid": args.num_hid,
            "gamma": args.gamma, "device": str(device),
            "cpu_median_s": cpu_med, "cpu_ratio": cpu_med[variant] / cpu_med["off"],
            "per_batch_ratio": _summary(per_batch), "per_batch_cpu_ratio": _summary(per_batch_cpu),
            "wilcoxon_p": _paired_test(times["off"], times[variant]),
            "wilcoxon_p_cpu": _paired_test(cpu["off"], cpu[variant]),
            "step_s": times, "step_cpu_s": cpu}


# ---------------------------------------------------------------------------------------------
# the breakdown
# ---------------------------------------------------------------------------------------------

def _record(store: Dict[str, tuple], name: str):
    def hook(module, args, kwargs, output):
        store[name] = (args, kwargs, output)
    return hook


@torch.no_grad()
def staged_forward(model: PatchedBan, v: Tensor, b: Tensor, q: Tensor) -> Tuple[Tensor, Dict[str, object]]:
    """``PatchedBan.forward(v, b, q)`` step by step: ``(answer logits (B, A), inputs of every part)``.

    ``v`` (B, K, v_dim), ``b`` (B, K, >=4), ``q`` (B, T) as for the model. The replay calls the
    same functions in the same order (``ban_attend``'s two calls, ``encode_glimpses``'s, the loop
    of ``ban_fuse``), so its logits equal the model's (tested in eval mode); the set encoder is
    called whole and forward hooks record the inputs of its optimiser, pairwise cost and LSTM.
    No gradient is recorded.
    """
    if not isinstance(model, PatchedBan):
        raise ValueError(f"model must be a PatchedBan (BAN + PO or BAN + LSTM), got {type(model).__name__}")
    ban, enc = model.ban, model.set_encoder
    B, G = v.shape[0], ban.glimpse
    mask = padding_mask(v)
    words = ban.w_emb(q)
    q_hidden = ban.q_emb.forward_all(words)
    att, logits = ban.v_att.forward_all(v, q_hidden)
    x, weights, set_mask = glimpse_sets(b, logits, model.box_proj(v), mask)
    seen: Dict[str, tuple] = {}
    watched = {}
    if enc.po is not None:
        watched["po"] = enc.po
        if enc.po.cost is not None:
            watched["cost"] = enc.po.cost
    handles = [m.register_forward_hook(_record(seen, name), with_kwargs=True) for name, m in watched.items()]
    try:
        h = enc(x, mask=set_mask, weights=weights)
    finally:
        for handle in handles:
            handle.remove()
    encoding = h.view(B, G, -1)
    extra = [model.p_prj[g](encoding[:, g]) for g in range(G)]
    boxes = b[:, :, :4].transpose(1, 2)  # the counter's (B, 4, K) layout, as in ban_fuse
    q_emb, q_per_glimpse, counts = q_hidden, [], []
    for g in range(G):
        q_per_glimpse.append(q_emb)
        b_emb = ban.b_net[g].forward_with_weights(v, q_emb, att[:, g])
        count = ban.counter(boxes, logits[:, g].max(2)[0])
        counts.append(count)
        q_emb = ban.q_prj[g](b_emb.unsqueeze(1)) + q_emb
        q_emb = q_emb + ban.c_prj[g](count).unsqueeze(1)
        q_emb = q_emb + extra[g].unsqueeze(1)
    out = ban.classifier(q_emb.sum(1))
    inputs = {"v": v, "b": b, "q": q, "mask": mask, "words": words, "q_hidden": q_hidden, "att": att,
              "logits": logits, "boxes": boxes, "x": x, "weights": weights, "set_mask": set_mask,
              "encoding": encoding, "q_per_glimpse": q_per_glimpse, "counts": counts, "q_final": q_emb,
              }
    if "po" in seen:
        inputs["P"] = seen["po"][2]
    inputs["seq"] = _permuted(x, weights, set_mask, inputs.get("P"))   # what the encoder's LSTM reads
    if "cost" in seen:
        args, _, C = seen["cost"]
        inputs["cost_x"], inputs["C"] = args[0], C       # PermutationOptimization calls cost(x, mask)
    return out, inputs


def _permuted(x: Tensor, weights: Tensor, set_mask: Tensor, P) -> Tensor:
    """The sequence the encoder's LSTM reads: relevance-weighted elements, ``P^T x`` (or, without P,
    the real elements in input order with the padding at the end), as ``PermutationSetEncoder`` does."""
    x = zero_padding(x, set_mask)
    x = x * torch.sigmoid(zero_padding(weights.unsqueeze(-1), set_mask))
    if P is not None:
        return apply_permutation(x, P)
    order = torch.argsort((~set_mask).to(torch.int8), dim=1, stable=True)
    return x.gather(1, order.unsqueeze(-1).expand_as(x))


def _leaf(t: Tensor) -> Tensor:
    """A detached copy that requires a gradient: an intermediate whose gradient the real step computes."""
    return t.detach().requires_grad_(True)


def part_functions(model: PatchedBan, inp: Dict[str, object], target: Tensor) -> Dict[str, Callable[[], object]]:
    """name -> a function running the part's forward on ``inp`` (from :func:`staged_forward`) and
    returning the outputs that get an upstream gradient of ones."""
    ban, enc = model.ban, model.set_encoder
    po = enc.po
    G = ban.glimpse
    v, b, q = inp["v"], inp["b"], inp["q"]
    set_mask = inp["set_mask"]

    def counter():
        logits = _leaf(inp["logits"])
        return [ban.counter(inp["boxes"], logits[:, g].max(2)[0]) for g in range(G)]

    def glimpse_loop():
        att = _leaf(inp["att"])
        out = []
        for g in range(G):
            b_emb = ban.b_net[g].forward_with_weights(v, _leaf(inp["q_per_glimpse"][g]), att[:, g])
            out.append(ban.q_prj[g](b_emb.unsqueeze(1)))
        return out

    def classifier():
        return vqa_bce_loss(ban.classifier(_leaf(inp["q_final"]).sum(1)), target)

    def set_construction():
        return list(glimpse_sets(b, _leaf(inp["logits"]), model.box_proj(v), inp["mask"])[:2])

    def permute():
        P = _leaf(inp["P"]) if "P" in inp else None
        return _permuted(_leaf(inp["x"]), _leaf(inp["weights"]), set_mask, P)

    def lstm():
        # as the encoder reads it: packed on CUDA, one fused call per set length on the CPU
        return last_state(enc.lstm, _leaf(inp["seq"]), set_mask.sum(1))

    parts: Dict[str, Callable[[], object]] = {
        "word embedding": lambda: ban.w_emb(q),
        "question GRU": lambda: ban.q_emb.forward_all(_leaf(inp["words"])),
        "bilinear attention": lambda: list(ban.v_att.forward_all(v, _leaf(inp["q_hidden"]))),
        "b_net + q_prj (glimpse loop)": glimpse_loop,
        "counter": counter,
        "c_prj": lambda: [ban.c_prj[g](_leaf(inp["counts"][g])) for g in range(G)],
        "classifier + loss": classifier,
        "set construction (box_proj + glimpse_sets)": set_construction,
    }
    if "C" in inp:
        parts["pairwise cost"] = lambda: po.cost(_leaf(inp["cost_x"]), set_mask)

        def inner_steps():
            init = po.linear(_leaf(inp["cost_x"])) if po.linear is not None else None
            return optimize_permutation(_leaf(inp["C"]), init, set_mask, eta=po.eta, steps=po.steps,
                                        sinkhorn_iters=po.sinkhorn_iters, temperature=po.temperature, grid=po.grid)
        parts["inner steps (descent + Sinkhorn)"] = inner_steps
    parts["permute"] = permute
    parts["LSTM over K boxes"] = lstm
    parts["p_prj"] = lambda: [model.p_prj[g](_leaf(inp["encoding"][:, g])) for g in range(G)]
    parts[ENCODER_WHOLE] = lambda: enc(_leaf(inp["x"]), mask=set_mask, weights=_leaf(inp["weights"]))
    return parts


def _forward_backward(fn: Callable[[], object]) -> None:
    out = fn()
    outs = [o for o in (out if isinstance(out, (list, tuple)) else [out]) if o.requires_grad]
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def _group(name: str) -> str:
    if name in BAN_PARTS:
        return "BAN"
    if name in ENCODER_PARTS:
        return "set encoder"
    if name == OPTIMISER_PART:
        return "optimiser"
    return "check"


def step_breakdown(model: PatchedBan, optimizer: torch.optim.Optimizer, batch, device, grad_clip: float,
                   repeats: int, warmup: int = 1) -> dict:
    """Median fwd+bwd seconds (wall and CPU) of every part of a training step of ``model`` on ``batch``.

    Each of ``warmup + repeats`` rounds: one whole ``train_step`` (timed), then clip + Adamax on its
    gradients (timed), then every part of :func:`part_functions` once. Returns per part the median,
    mean and std of wall and CPU seconds, its group and share of the whole step (medians), and the
    rest (step minus the summed parts).
    """
    if not isinstance(model, PatchedBan):
        raise ValueError(f"model must be a PatchedBan (BAN + PO or BAN + LSTM), got {type(model).__name__}")
    v, b, q, target = batch.v.to(device), batch.b.to(device), batch.q.to(device), batch.target.to(device)
    _, inp = staged_forward(model, v, b, q)
    parts = part_functions(model, inp, target)
    params = list(model.parameters())
    wall: Dict[str, List[float]] = {n: [] for n in ["step", OPTIMISER_PART, *parts]}
    cpu: Dict[str, List[float]] = {n: [] for n in wall}

    def timed(name: str, fn: Callable[[], None], keep: bool) -> None:
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        if keep:
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)

    def clip_and_step():
        nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()

    for r in range(warmup + repeats):
        keep = r >= warmup
        timed("step", lambda: train_step(model, optimizer, batch, device, grad_clip), keep)
        timed(OPTIMISER_PART, clip_and_step, keep)   # on the gradients the step left
        for name, fn in parts.items():
            model.zero_grad(set_to_none=True)        # as in the real step: gradients written, not added
            timed(name, lambda: _forward_backward(fn), keep)
    model.zero_grad(set_to_none=True)
    step, step_cpu = statistics.median(wall["step"]), statistics.median(cpu["step"])
    rows = []
    for name in wall:
        if name == "step":
            continue
        w, c = _summary(wall[name]), _summary(cpu[name])
        rows.append({"part": name, "group": _group(name), "wall_s": w, "cpu_s": c,
                     "share": w["median"] / step, "share_cpu": c["median"] / step_cpu})
    counted = [r for r in rows if r["group"] != "check"]
    rest = step - sum(r["wall_s"]["median"] for r in counted)
    rest_cpu = step_cpu - sum(r["cpu_s"]["median"] for r in counted)
    pieces = [r for r in rows if r["part"] in ENCODER_PIECES]
    whole = next(r for r in rows if r["part"] == ENCODER_WHOLE)
    group_sums = {g: {"wall_s": sum(r["wall_s"]["median"] for r in counted if r["group"] == g),
                      "cpu_s": sum(r["cpu_s"]["median"] for r in counted if r["group"] == g)}
                  for g in ("BAN", "set encoder", "optimiser")}
    K = int(v.shape[1])
    n = inp["mask"].sum(1)
    return {"step_s": _summary(wall["step"]), "step_cpu_s": _summary(cpu["step"]), "rows": rows,
            "rest_s": rest, "rest_cpu_s": rest_cpu, "rest_share": rest / step, "rest_share_cpu": rest_cpu / step_cpu,
            "groups": group_sums,
            "encoder_pieces_over_whole": sum(r["wall_s"]["median"] for r in pieces) / whole["wall_s"]["median"],
            "encoder_pieces_over_whole_cpu": sum(r["cpu_s"]["median"] for r in pieces) / whole["cpu_s"]["median"],
            "batch": {"B": int(v.shape[0]), "K": K, "boxes_min": int(n.min()), "boxes_max": int(n.max()),
                      "boxes_mean": float(n.float().mean()), "sets": int(inp["x"].shape[0])},
            "repeats": repeats, "permutation": model.permutation, "kernel": getattr(model.set_encoder.po, "kernel",
                                                                                      None)}


def median_box_batch(batches: Sequence) -> object:
    """The batch whose padded box count K is the median of ``batches``' (the first such)."""
    Ks = sorted(int(bt.v.shape[1]) for bt in batches)
    k = Ks[(len(Ks) - 1) // 2]
    return next(bt for bt in batches if int(bt.v.shape[1]) == k)


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

def _ms(s: float) -> str:
    return f"{1000 * s:.3g}" if abs(s) < 1 else f"{1000 * s:.0f}"


def markdown_tables(result: dict) -> str:
    """The whole-step comparison and, when present, the breakdown as Markdown tables."""
    v = result["variant"]
    r = result
    lines = ["| model | step ms (wall, median) | step ms (CPU, median) |", "|---|---|---|",
             f"| BAN | {_ms(r['median_s']['off'])} | {_ms(r['cpu_median_s']['off'])} |",
             f"| BAN + {v} | {_ms(r['median_s'][v])} | {_ms(r['cpu_median_s'][v])} |",
             f"| ratio of medians | {r['ratio']:.3f} | {r['cpu_ratio']:.3f} |",
             f"| per-batch ratio, mean ± std | {r['per_batch_ratio']['mean']:.3f} ± {r['per_batch_ratio']['std']:.3f} "
             f"| {r['per_batch_cpu_ratio']['mean']:.3f} ± {r['per_batch_cpu_ratio']['std']:.3f} |",
             f"| Wilcoxon signed-rank p ({r['steps']} paired steps) | {_p(r['wilcoxon_p'])} | {_p(r['wilcoxon_p_cpu'])} |"]
    bd = result.get("breakdown")
    if bd:
        bt = bd["batch"]
        lines += ["", f"Breakdown of one BAN + {v} step (B = {bt['B']}, K = {bt['K']}, {bt['boxes_min']}-"
                      f"{bt['boxes_max']} boxes, {bt['sets']} sets; medians of {bd['repeats']} rounds):", "",
                  "| part | group | wall ms | CPU ms (mean ± std) | share of step (wall) | share (CPU) |",
                  "|---|---|---|---|---|---|",
                  f"| **whole step** | | {_ms(bd['step_s']['median'])} | {_ms(bd['step_cpu_s']['median'])} "
                  f"({_ms(bd['step_cpu_s']['mean'])} ± {_ms(bd['step_cpu_s']['std'])}) | 1 | 1 |"]
        for row in bd["rows"]:
            c = row["cpu_s"]
            lines.append(f"| {row['part']} | {row['group']} | {_ms(row['wall_s']['median'])} | {_ms(c['median'])} "
                         f"({_ms(c['mean'])} ± {_ms(c['std'])}) | {row['share']:.3f} | {row['share_cpu']:.3f} |")
        lines.append(f"| the rest (step − parts) | | {_ms(bd['rest_s'])} | {_ms(bd['rest_cpu_s'])} | "
                     f"{bd['rest_share']:.3f} | {bd['rest_share_cpu']:.3f} |")
        for g, s in bd["groups"].items():
            lines.append(f"| sum: {g} | | {_ms(s['wall_s'])} | {_ms(s['cpu_s'])} | "
                         f"{s['wall_s'] / bd['step_s']['median']:.3f} | {s['cpu_s'] / bd['step_cpu_s']['median']:.3f} |")
        lines += ["", f"Encoder pieces (cost, inner steps, permute, LSTM) / whole encoder: "
                      f"{bd['encoder_pieces_over_whole']:.2f} (wall), {bd['encoder_pieces_over_whole_cpu']:.2f} (CPU)."]
    return "\n".join(lines)


def _p(p: Optional[float]) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ban_step_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.add_argument("--steps", type=positive_int, default=10,
                   help="timed training steps per model (and timed rounds of the breakdown)")
    p.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                   help="time every part of a BAN + variant step alone (default on)")
    p.set_defaults(out="runs/benchmarks/ban_step_time.json", workers=0)
    for action in p._actions:              # the shared parser's --out help describes a run folder
        if action.dest == "out":
            action.help = "JSON file of the result (default runs/benchmarks/ban_step_time.json)"
    args = resolve_train_args(p.parse_args(argv), p)
    if args.permutation == "off":
        p.error("--permutation off is the baseline every variant is timed against: choose none, po-u or po-la")
    # of the shared training parser's run flags only --overwrite applies (to the result file): the
    # benchmark trains nothing to keep, it times --steps steps of each model
    out = ensure_new(Path(args.out), overwrite=args.overwrite)       # before the time is spent
    pair = build_pair(args)
    batches: List = []
    result = {"variant": args.permutation, **compare_step_time(args, pair, batches)}
    if args.breakdown:
        device, models, optims, _ = pair
        result["breakdown"] = step_breakdown(models[args.permutation], optims[args.permutation],
                                             median_box_batch(batches), device, args.grad_clip, args.steps)
    print(markdown_tables(result))
    write_json(out, {"args": {k: str(v) for k, v in vars(args).items()}, **result})
    print(f"results: {out}")
    return result


def _command(argv=None) -> int:
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(_command, "python -m benchmarks.ban_step_time"))
