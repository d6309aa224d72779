"""Train BAN, BAN + LSTM or BAN + PO-U on VQA v2 features in the official layout (or the synthetic set).

    python -m integrations.ban.train --data-root DATA --mode po            # paper appendix F.4
    python -m integrations.ban.train --data-root DATA --mode none --ban-root ~/ban-vqa   # official model
    torchrun --nproc_per_node 4 -m integrations.ban.train --data-root DATA --mode po     # DDP

Defaults are the official BAN recipe (jnhwkim/ban-vqa ``main.py`` / ``train.py``; facts in
``shared/specs/ban-official.md``): num_hid 1280, op 'c', 8 glimpses, Adamax with base lr 1e-3,
lr 0.5 / 1 / 1.5 / 2 x base in epochs 0-3, then 2 x base, x0.25 at epochs 10, 12, ...; 13 epochs;
batch 256 (global, split over DDP processes); loss = mean BCE-with-logits x number of answers;
grad-norm clip 0.25; metric = VQA soft accuracy of the arg-max answer.

Output folder (``--out``): ``config.json``, ``checkpoints/step_*.pt`` (every epoch, and when
``--max-steps`` stops mid-epoch; each stores the resolved config, model, optimiser, RNG states
and the position in the epoch, so ``--resume`` continues exactly), ``tb/`` (TensorBoard: loss,
train / val soft accuracy, lr, grad norm, learned eta and permutation entropy every step),
``metrics.json`` (per-epoch summary).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from integrations.common import (RunDir, add_kernel_argument, cleanup_distributed, config_to_dict, init_distributed,
                                 latest_checkpoint, load_checkpoint, progress, resolve_device, save_checkpoint,
                                 seed_everything)

from .data import (QUESTION_FILES, Dictionary, VQADataError, VQAFeatureDataset, collate_vqa, load_glove_init,
                   tfidf_word_embedding)

# hyper-parameters that must not change between a run and its --resume
_RESUME_KEYS = ("mode", "num_hid", "gamma", "op", "tfidf", "batch_size", "lr", "warmup", "lr_decay_start",
                "lr_decay_every", "lr_decay_rate", "grad_clip", "seed", "use_both", "fixed36", "bucket", "ban_root")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train BAN / BAN+LSTM / BAN+PO-U on VQA v2 (official data layout).")
    p.add_argument("--data-root", required=True, help="folder with the official data/ layout (or a synth dataset)")
    p.add_argument("--ban-root", default=None,
                   help="checkout of jnhwkim/ban-vqa: build the OFFICIAL model (via integrations.ban.official)")
    p.add_argument("--mode", choices=["po", "lstm", "none"], default="po",
                   help="po: BAN + PO-U (paper F.4), lstm: BAN + LSTM (no permutation), none: plain BAN")
    add_kernel_argument(p)
    p.add_argument("--num-hid", type=int, default=1280, help="BAN hidden size H")
    p.add_argument("--gamma", type=int, default=8, help="number of glimpses G")
    p.add_argument("--op", default="c", help="word embedding: 'c' = GloVe + tf-idf GloVe (600-d), '' = GloVe")
    p.add_argument("--no-tfidf", dest="tfidf", action="store_false",
                   help="initialise the second embedding table with plain GloVe (official --tfidf switch)")
    p.add_argument("--epochs", type=int, default=13)
    p.add_argument("--batch-size", type=int, default=256, help="global batch (split over DDP processes)")
    p.add_argument("--lr", type=float, default=None, help="base lr (official: 1e-3, 7e-4 with --use-both)")
    p.add_argument("--warmup", type=float, nargs="*", default=[0.5, 1.0, 1.5, 2.0],
                   help="lr multipliers of the first epochs")
    p.add_argument("--lr-decay-start", type=int, default=10)
    p.add_argument("--lr-decay-every", type=int, default=2)
    p.add_argument("--lr-decay-rate", type=float, default=0.25)
    p.add_argument("--grad-clip", type=float, default=0.25, help="max total grad norm")
    p.add_argument("--use-both", action="store_true", help="train on train + val, no evaluation (official)")
    p.add_argument("--bucket", action="store_true",
                   help="batch images of similar box counts together (less padding; not in the official recipe)")
    p.add_argument("--fixed36", action="store_true", help="use the fixed-36 {split}36.hdf5 features")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps (smoke runs)")
    p.add_argument("--seed", type=int, default=1204, help="official main.py default")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1 ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per process (official: 1)")
    p.add_argument("--out", default=None, help="run folder (default runs/ban/<mode>-seed<seed>)")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from the latest checkpoint in --out, or from the given checkpoint file")
    p.add_argument("--log-every", type=int, default=1, help="TensorBoard scalars every N steps")
    p.add_argument("--compare-step-time", type=int, default=0, metavar="N",
                   help="instead of training: time N training steps of --mode against plain BAN, interleaved on "
                        "the same batches, and print the medians")
    a = p.parse_args(argv)
    if a.lr is None:
        a.lr = 7e-4 if a.use_both else 1e-3
    if a.out is None:
        a.out = f"runs/ban/{a.mode}-seed{a.seed}"
    for name in ("num_hid", "gamma", "epochs", "batch_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(a, name)}")
    return a


# ---------------------------------------------------------------------------------------------
# recipe: lr schedule, loss, metric (pure functions)
# ---------------------------------------------------------------------------------------------

def official_lr(epoch: int, base: float, warmup=(0.5, 1.0, 1.5, 2.0), decay_start: int = 10,
                decay_every: int = 2, decay_rate: float = 0.25) -> float:
    """The lr of ``epoch`` (0-based) in the official schedule.

    warm-up multipliers for the first len(warmup) epochs, then the last warm-up value, multiplied
    by ``decay_rate`` at every epoch ``decay_start, decay_start + decay_every, ...`` up to ``epoch``.
    """
    if epoch < len(warmup):
        return warmup[epoch] * base
    top = (warmup[-1] if warmup else 1.0) * base
    n_decays = 0 if epoch < decay_start else (epoch - decay_start) // decay_every + 1
    return top * decay_rate ** n_decays


def vqa_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Official loss: mean binary cross-entropy over (B, A) times A (= sum over answers, mean over batch)."""
    return F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]


def soft_scores(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) VQA soft accuracy of the arg-max answer: its soft score in ``target`` (B, A)."""
    return target.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

def init_word_embedding(ban: nn.Module, glove: np.ndarray, tfidf_init: Optional[np.ndarray] = None) -> None:
    """What the official ``WordEmbedding.init_embedding`` does, for either BAN implementation.

    ``w_emb.emb`` <- GloVe; with op 'c' the second table ``w_emb.emb_`` <- the tf-idf weighted
    GloVe and becomes trainable (official), or <- GloVe and stays frozen without tf-idf.
    """
    w = ban.w_emb
    n = glove.shape[0]
    with torch.no_grad():
        w.emb.weight[:n] = torch.from_numpy(glove)
        if hasattr(w, "emb_"):
            w.emb_.weight[:n] = torch.from_numpy(tfidf_init if tfidf_init is not None else glove)
    if hasattr(w, "emb_") and tfidf_init is not None:
        w.emb_.weight.requires_grad_(True)


def build_model(args, ntoken: int, num_answers: int, v_dim: int) -> nn.Module:
    """BAN (official via --ban-root, else integrations.ban.model), patched for --mode."""
    from . import patch_ban

    if args.ban_root:
        from .official import build_official_ban

        ban = build_official_ban(args.ban_root, ntoken, num_answers, v_dim=v_dim, num_hid=args.num_hid,
                                 op=args.op, gamma=args.gamma)
    else:
        from .model import build_ban

        ban = build_ban(ntoken, num_answers, v_dim=v_dim, num_hid=args.num_hid, op=args.op, gamma=args.gamma)
    glove = load_glove_init(args.data_root, ntoken)
    tfidf = None
    if "c" in args.op and args.tfidf:
        root, qs = Path(args.data_root), []
        for split in ("train", "val", "test2015"):  # official: tf-idf over train, val and test questions
            qfile = root / QUESTION_FILES[split]
            if qfile.is_file():
                qs += [q["question"] for q in json.loads(qfile.read_text())["questions"]]
        tfidf = tfidf_word_embedding(qs, Dictionary.load(root / "dictionary.pkl"), glove)
    init_word_embedding(ban, glove, tfidf)
    patched = patch_ban(ban, mode=args.mode, kernel=args.kernel)
    return patched if patched is not None else ban


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def box_counts(ds) -> np.ndarray:
    """Number of boxes of every item (from ``pos_boxes``; no feature is read)."""
    if isinstance(ds, ConcatDataset):
        return np.concatenate([box_counts(d) for d in ds.datasets])
    return np.array([ds.num_boxes(i) for i in range(len(ds))])


def epoch_batches(indices: list, batch_size: int, counts: Optional[np.ndarray] = None, pool: int = 16,
                  seed: int = 0) -> list:
    """Cut an epoch's (shuffled) index list into batches.

    With ``counts`` (box count per dataset item) the batches are bucketed: every pool of
    ``pool`` consecutive batches is sorted by box count before cutting, and the batch order is
    shuffled again, so each batch pads to a similar K (less padding, same samples per epoch).
    Without it the cut is the plain official one.
    """
    if counts is None:
        return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    batches = []
    span = pool * batch_size
    for s in range(0, len(indices), span):
        chunk = sorted(indices[s:s + span], key=lambda i: counts[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[i] for i in order]


def make_loader(ds, batch_size: int, *, shuffle: bool, epoch: int, seed: int, rank: int, world: int,
                skip_batches: int = 0, workers: int = 0, counts: Optional[np.ndarray] = None) -> DataLoader:
    # The epoch's batches are a pure function of (seed, epoch, rank): a resumed run skips the
    # batches it has done and sees exactly the rest. Evaluation uses strided shards without
    # DistributedSampler's padding, so no sample counts twice.
    if shuffle:
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        # the bucket shuffle is seeded by (seed, epoch) only: all ranks get equally many batches
        batches = epoch_batches(list(sampler), batch_size, counts, seed=seed * 100_003 + epoch)[skip_batches:]
    else:
        batches = epoch_batches(list(range(rank, len(ds), world)), batch_size)
    # own generator: creating the iterator must not consume the global RNG (exact resume)
    return DataLoader(ds, batch_sampler=batches, collate_fn=collate_vqa, num_workers=workers,
                      generator=torch.Generator().manual_seed(seed))


def load_question_types(root) -> Optional[dict]:
    """question_id -> type from a synthetic dataset's ``synth_meta.json`` (None for real data)."""
    meta = Path(root) / "synth_meta.json"
    if not meta.is_file():
        return None
    return {int(k): v for k, v in json.loads(meta.read_text())["question_type"].items()}


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device, qtypes: Optional[dict] = None, world: int = 1) -> dict:
    """Soft accuracy (and its upper bound, and per question type when known) over the whole split."""
    was_training = model.training
    model.eval()
    names = sorted(set(qtypes.values())) if qtypes else []
    sums = torch.zeros(3 + 2 * len(names), dtype=torch.float64)  # score, bound, n, (score, n) per type
    for batch in loader:
        logits, _ = model(batch.v.to(device), batch.b.to(device), batch.q.to(device), None)
        target = batch.target.to(device)
        s = soft_scores(logits, target).double().cpu()
        sums[0] += s.sum()
        sums[1] += target.max(1).values.double().sum().cpu()
        sums[2] += len(s)
        for i, qid in enumerate(batch.question_id.tolist()):
            if qtypes and qid in qtypes:
                j = names.index(qtypes[qid])
                sums[3 + 2 * j] += s[i]
                sums[4 + 2 * j] += 1
    if world > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    model.train(was_training)
    out = {"soft_acc": float(sums[0] / sums[2]), "upper_bound": float(sums[1] / sums[2]), "n": int(sums[2])}
    for j, name in enumerate(names):
        if sums[4 + 2 * j] > 0:
            out[f"soft_acc/{name}"] = float(sums[3 + 2 * j] / sums[4 + 2 * j])
    return out


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def train_step(model, optimizer, batch, device, grad_clip):
    """One official step: forward, BCE x A, backward, clip, Adamax. Returns (loss, score sum, grad norm)."""
    v, b, q, target = batch.v.to(device), batch.b.to(device), batch.q.to(device), batch.target.to(device)
    logits, _ = model(v, b, q, target)
    loss = vqa_bce_loss(logits, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), soft_scores(logits.detach(), target).sum(), norm


def _datasets(args):
    dictionary = Dictionary.load(Path(args.data_root) / "dictionary.pkl")
    adaptive = not args.fixed36
    train_ds = VQAFeatureDataset(args.data_root, "train", dictionary, adaptive=adaptive)
    val_ds = VQAFeatureDataset(args.data_root, "val", dictionary, adaptive=adaptive)
    if args.use_both:
        return dictionary, ConcatDataset([train_ds, val_ds]), None, train_ds
    return dictionary, train_ds, val_ds, train_ds


def run(args) -> dict:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = init_distributed(device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    if args.batch_size % info.world_size:
        raise ValueError(f"--batch-size: {args.batch_size} is not divisible by the {info.world_size} processes")
    local_batch = args.batch_size // info.world_size

    seed_everything(args.seed)  # same on every rank: identical initial weights (DDP also broadcasts them)
    dictionary, train_ds, val_ds, ref = _datasets(args)
    model = build_model(args, dictionary.ntoken, ref.num_ans_candidates, ref.v_dim).to(device)
    if args.mode == "po":
        from setperm.monitor import set_entropy_tracking

        set_entropy_tracking(model, True)
    net = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.Adamax([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    config = config_to_dict(args)
    config.update(world_size=info.world_size, ntoken=dictionary.ntoken, num_answers=ref.num_ans_candidates,
                  v_dim=ref.v_dim, command=" ".join(sys.argv))
    run_dir = RunDir(args.out, config if not args.resume else None, rank=info.rank)
    epoch, skip, step = 0, 0, 0
    sums = [0.0, 0.0, 0]  # loss x n, score, n of the current epoch (kept across a mid-epoch resume)
    history = []
    if args.resume:
        path = latest_checkpoint(run_dir.checkpoints) if args.resume == "latest" else Path(args.resume)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir.checkpoints}")
        old = torch.load(path, map_location="cpu", weights_only=False)["config"]
        diff = {k: (old.get(k), config.get(k)) for k in _RESUME_KEYS if old.get(k) != config.get(k)}
        if diff:
            raise ValueError(f"--resume: {path} was trained with different settings {diff} (checkpoint, now)")
        state = load_checkpoint(path, model=model, optimizer=optimizer, map_location=device)
        ex = state["extra"]
        epoch, skip, step, sums, history = ex["epoch"], ex["batch_in_epoch"], state["step"], ex["sums"], ex["history"]
    qtypes = load_question_types(args.data_root)
    counts = box_counts(train_ds) if args.bucket else None
    writer = run_dir.writer
    from setperm.monitor import log_step_sizes

    def checkpoint(ep, batch_in_epoch):
        if info.is_main:
            save_checkpoint(run_dir.checkpoints, config=config, step=step, model=model, optimizer=optimizer,
                            extra={"epoch": ep, "batch_in_epoch": batch_in_epoch, "sums": sums, "history": history})

    steps_per_epoch = math.ceil(len(DistributedSampler(train_ds, info.world_size, info.rank)) / local_batch)
    stop = args.max_steps is not None and step >= args.max_steps
    while epoch < args.epochs and not stop:
        lr = official_lr(epoch, args.lr, args.warmup, args.lr_decay_start, args.lr_decay_every, args.lr_decay_rate)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loader = make_loader(train_ds, local_batch, shuffle=True, epoch=epoch, seed=args.seed, rank=info.rank,
                             world=info.world_size, skip_batches=skip, workers=args.workers, counts=counts)
        net.train()
        bar = progress(loader, total=steps_per_epoch, initial=skip, desc=f"{args.mode} epoch {epoch}",
                       disable=None if info.is_main else True)
        i = skip
        for batch in bar:
            t0 = time.perf_counter()
            loss, score, norm = train_step(net, optimizer, batch, device, args.grad_clip)
            n = len(batch.q)
            stats = torch.tensor([loss.item() * n, score.item(), n], dtype=torch.float64)
            if info.enabled:  # epoch metrics over all ranks (the loss itself is already averaged by DDP)
                stats = stats.to(device)
                dist.all_reduce(stats)
                stats = stats.cpu()
            sums = [sums[0] + float(stats[0]), sums[1] + float(stats[1]), sums[2] + int(stats[2])]
            step += 1
            i += 1
            if writer is not None and step % args.log_every == 0:
                writer.add_scalar("train/loss", float(stats[0] / stats[2]), step)
                writer.add_scalar("train/soft_acc", float(stats[1] / stats[2]), step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/grad_norm", float(norm), step)
                writer.add_scalar("time/step_s", time.perf_counter() - t0, step)
                log_step_sizes(writer, model, step)
            bar.set_postfix(loss=f"{sums[0] / sums[2]:.3f}", acc=f"{100 * sums[1] / sums[2]:.1f}")
            if args.max_steps is not None and step >= args.max_steps:
                stop = True
                break
        bar.close()
        if i < steps_per_epoch:  # stopped mid-epoch by --max-steps
            checkpoint(epoch, i)
            if info.is_main:
                print(f"stopped by --max-steps at step {step} (epoch {epoch}, batch {i}/{steps_per_epoch}), "
                      f"train loss {sums[0] / max(sums[2], 1):.4f}; checkpoint in {run_dir.checkpoints} "
                      "(continue with --resume)", flush=True)
            break
        record = {"epoch": epoch, "step": step, "lr": lr, "train_loss": sums[0] / sums[2],
                  "train_soft_acc": sums[1] / sums[2]}
        if val_ds is not None:
            val_loader = make_loader(val_ds, local_batch, shuffle=False, epoch=0, seed=args.seed, rank=info.rank,
                                     world=info.world_size, workers=args.workers)
            ev = evaluate(model, val_loader, device, qtypes, info.world_size)
            record.update({f"val_{k}": v for k, v in ev.items()})
        history.append(record)
        if writer is not None:
            writer.add_scalar("epoch/train_loss", record["train_loss"], step)
            writer.add_scalar("epoch/train_soft_acc", record["train_soft_acc"], step)
            for k, v in record.items():
                if k.startswith("val_") and k != "val_n":
                    writer.add_scalar("epoch/" + k.replace("val_", "val/"), v, step)
        if info.is_main:
            msg = f"epoch {epoch}: loss {record['train_loss']:.4f} train acc {100 * record['train_soft_acc']:.2f}"
            if "val_soft_acc" in record:
                msg += f" val acc {100 * record['val_soft_acc']:.2f} (bound {100 * record['val_upper_bound']:.2f})"
            print(msg, flush=True)
        epoch, skip, sums = epoch + 1, 0, [0.0, 0.0, 0]
        checkpoint(epoch, 0)
    if info.is_main:
        run_dir.write_json("metrics.json", {"history": history, "step": step})
    run_dir.close()
    result = {"history": history, "step": step, "model": model}
    cleanup_distributed()
    return result


def compare_step_time(args) -> dict:
    """Median time of a training step of --mode vs plain BAN, interleaved on the same batches."""
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dictionary, train_ds, _, ref = _datasets(args)
    models, optims = {}, {}
    for mode in ("none", args.mode):
        seed_everything(args.seed)
        m = build_model(argparse.Namespace(**{**vars(args), "mode": mode}), dictionary.ntoken,
                        ref.num_ans_candidates, ref.v_dim).to(device)
        models[mode] = m
        optims[mode] = torch.optim.Adamax([p for p in m.parameters() if p.requires_grad], lr=args.lr)
    loader = make_loader(train_ds, args.batch_size, shuffle=True, epoch=0, seed=args.seed, rank=0, world=1,
                         counts=box_counts(train_ds) if args.bucket else None)
    times = {m: [] for m in models}
    batches = itertools.islice(itertools.cycle(loader), args.compare_step_time + 2)
    for k, batch in enumerate(batches):
        for mode in (models if k % 2 == 0 else list(models)[::-1]):  # alternate the order
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            train_step(models[mode], optims[mode], batch, device, args.grad_clip)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if k >= 2:  # two warm-up steps
                times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(t) for m, t in times.items()}
    return {"median_s": med, "ratio": med[args.mode] / med["none"], "steps": len(times["none"]),
            "threads": torch.get_num_threads(), "batch_size": args.batch_size, "device": str(device)}


def main(argv=None):
    args = parse_args(argv)
    if args.compare_step_time:
        r = compare_step_time(args)
        print(json.dumps(r, indent=1))
        return r
    return run(args)


if __name__ == "__main__":
    try:
        main()
    except (VQADataError, FileNotFoundError) as e:  # bad data: one clear line, not a traceback
        sys.exit(f"python -m integrations.ban.train: error: {e}")
