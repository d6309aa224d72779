"""Training-step time of BAN + PO (or BAN + LSTM) against plain BAN, side by side on the same batches.

    python -m benchmarks.ban_step_time --data-root runs/ban/synth --permutation po-u --num-hid 64 --gamma 2 \
        --batch-size 32 --steps 20 --threads 1

Both models are built with the same seed and trained on the same batches, alternating which one
goes first after two warm-up steps; the medians of ``--steps`` full training steps (forward,
backward, clip, Adamax) and their ratio are printed and written to ``--out`` (JSON).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from integrations.ban.cli import add_train_arguments, resolve_train_args
from integrations.ban.train import box_counts, build_model, datasets, make_loader, train_step
from integrations.common import positive_int, resolve_device, seed_everything


def compare_step_time(args) -> dict:
    """Median seconds per training step of ``args.permutation`` vs plain BAN (``off``)."""
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
                         counts=box_counts(train_ds) if args.bucket else None)
    times = {m: [] for m in models}
    for k, batch in enumerate(itertools.islice(itertools.cycle(loader), args.steps + 2)):
        for variant in (models if k % 2 == 0 else list(models)[::-1]):  # alternate the order
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(models[variant], optims[variant], batch, device, args.grad_clip)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k >= 2:  # two warm-up steps
                times[variant].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"median_s": med, "ratio": med[args.permutation] / med["off"], "steps": len(times["off"]),
            "threads": torch.get_num_threads(), "batch_size": args.batch_size, "num_hid": args.num_hid,
            "gamma": args.gamma, "device": str(device)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ban_step_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    p.add_argument("--steps", type=positive_int, default=10, help="timed training steps per model")
    p.set_defaults(out="runs/benchmarks/ban_step_time.json", workers=0)
    for action in p._actions:              # the shared parser's --out help describes a run folder
        if action.dest == "out":
            action.help = "JSON file of the result (default runs/benchmarks/ban_step_time.json)"
    args = resolve_train_args(p.parse_args(argv), p)
    if args.permutation == "off":
        p.error("--permutation off is the baseline every variant is timed against: choose none, po-u or po-la")
    # the run flags of the shared training parser (--resume, --overwrite, --epochs, --max-steps) do not
    # apply: the benchmark trains nothing to keep, it times --steps steps of each model
    result = compare_step_time(args)
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **result}, indent=1) + "\n")
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
