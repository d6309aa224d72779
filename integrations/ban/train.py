"""Training and evaluation of BAN, BAN + LSTM and BAN + PO on VQA v2 features in the official layout
(or the synthetic set): the official recipe on the shared run lifecycle of ``integrations.common``.

The recipe (ban-vqa ``main.py`` / ``train.py``): num_hid 1280, op 'c', 8 glimpses, Adamax with base lr
1e-3, lr 0.5 / 1 / 1.5 / 2 x base in epochs 0-3, then 2 x base, x0.25 at epochs 10, 12, ...; 13 epochs;
batch 256 (global, split over DDP processes); loss = mean BCE-with-logits x number of answers; grad-norm
clip 0.25; metric = VQA soft accuracy of the arg-max answer.

A run folder holds ``config.json``, ``checkpoints/step_*.pt`` (every epoch, when ``--max-steps`` stops
mid-epoch and on SIGINT / SIGTERM; each with the resolved config, model, optimiser, RNG states, the
position in the epoch and the epoch's running sums, so ``--resume`` continues exactly), ``tb/``
(TensorBoard) and ``summary.json`` (per-epoch history; ``finished`` once all epochs ran).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import signal
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from integrations.common import (CommandError, RunError, cleanup_distributed, finite_loss, generator, init_distributed,
                                 open_run, progress, resolve_device, seed_everything, seeded_generator)
from integrations.common.cli import checkpoint_config
from setperm.monitor import PermutationMonitor

from .data import QUESTION_FILES, Dictionary, VQAFeatureDataset, collate_vqa, load_glove_init, tfidf_word_embedding
from .plugin import PERMUTATIONS, PatchedBan

# Settings that only say how long to train: they may grow on --resume.
_MAY_CHANGE = ("epochs",)
# The official counter keeps the 10 highest-attention boxes of every image (``topk(10)`` in its
# counting.py) and fails on a batch with fewer. Zero rows are BAN's padding (attention logit -inf,
# nothing to count), so batches for the official model are padded to at least this many boxes.
OFFICIAL_MIN_BOXES = 10
# Settings added after the first runs were recorded: stored only when they differ from these defaults,
# so a run (or a compare sweep) recorded before them resumes, and is recognised as finished, unchanged.
LATE_SETTINGS = {"order_by": "all", "oracle_relevance": False, "num_positions": None, "straight_through": False,
                 "amp": False, "tfidf_weighting": "idf", "read": "auto"}


def setting(args, name: str):
    """``args.name``, or its default for a config recorded before the setting existed."""
    return getattr(args, name, LATE_SETTINGS[name])


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


def ban_root_path(value) -> str:
    """``--ban-root`` as the absolute path of a ban-vqa checkout; CommandError naming the flag otherwise."""
    from .official import check_root

    try:
        return str(check_root(value))
    except (OSError, ValueError) as e:
        raise CommandError(f"--ban-root: {str(e).removeprefix('ban_root: ')}") from None


def min_boxes(args) -> int:
    """The fewest boxes a batch of this run's model may have (:data:`OFFICIAL_MIN_BOXES` for the official model;
    the self-contained one pads inside its counter)."""
    return OFFICIAL_MIN_BOXES if getattr(args, "ban_root", None) else 0


def build_model(args, ntoken: int, num_answers: int, v_dim: int) -> nn.Module:
    """BAN (official via ``ban_root``, else integrations.ban.model), patched for ``args.permutation``."""
    from . import patch_ban

    if args.ban_root:
        from .official import build_official_ban

        try:
            ban = build_official_ban(ban_root_path(args.ban_root), ntoken, num_answers, v_dim=v_dim,
                                     num_hid=args.num_hid, op=args.op, gamma=args.gamma)
        except ImportError as e:
            raise CommandError(f"--ban-root: {e}") from None
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
                qs += [q["question"] for q in json.loads(qfile.read_text(encoding="utf-8"))["questions"]]
        tfidf = tfidf_word_embedding(qs, Dictionary.load(root / "dictionary.pkl"), glove,
                                     weighting=setting(args, "tfidf_weighting"))
    init_word_embedding(ban, glove, tfidf)
    if args.permutation == "off":
        return patch_ban(ban, permutation="off")
    extra = {"num_positions": setting(args, "num_positions")} if args.permutation == "po-la" else {}
    if setting(args, "straight_through"):
        extra["straight_through"] = True
    return patch_ban(ban, permutation=args.permutation, kernel=args.kernel, order_by=setting(args, "order_by"),
                     read=setting(args, "read"), **extra)


def relevance_oracle(args):
    """The ground-truth box relevance of a synthetic dataset for ``--oracle-relevance`` runs, else None."""
    if not setting(args, "oracle_relevance"):
        return None
    from .research.synth_oracle import RelevanceOracle

    if not (Path(args.data_root) / "synth_meta.json").is_file():
        raise CommandError(f"--oracle-relevance: {args.data_root} is not a synthetic dataset (no synth_meta.json); "
                         "the ground-truth relevance is decoded from the synthetic set's files")
    return RelevanceOracle(args.data_root, adaptive=not args.fixed36)


def model_inputs(model, oracle, batch, device) -> dict:
    """Keyword inputs of the model beyond (v, b, q, labels) for ``batch``: the oracle's relevance when
    there is one, and for a ``PatchedBan`` the box counts on the host (its set encoder then needs no
    device -> host copy of the set sizes)."""
    inputs = {}
    if isinstance(getattr(model, "module", model), PatchedBan):          # (DDP wraps it)
        # a list: DistributedDataParallel would move a tensor to the GPU
        inputs["box_counts"] = batch.mask.sum(1).tolist()
    if oracle is not None:
        inputs["relevance"] = oracle(batch.question_id, batch.v.shape[1]).to(device)
    return inputs


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
    shuffled again (by ``seed``), so each batch pads to a similar K (less padding, same samples per
    epoch). Without it the cut is the plain official one.
    """
    if counts is None:
        return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    batches = []
    span = pool * batch_size
    for s in range(0, len(indices), span):
        chunk = sorted(indices[s:s + span], key=lambda i: counts[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=seeded_generator(seed)).tolist()
    return [batches[i] for i in order]


def epoch_indices(n: int, *, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list:
    """This rank's shuffled indices of an epoch: one permutation from ``(seed, epoch)`` shared by all
    ranks, padded by wrapping around to a multiple of ``world`` (as DistributedSampler does) and
    strided, so every rank gets the same number of samples."""
    order = torch.randperm(n, generator=generator(seed, epoch)).tolist()
    total = math.ceil(n / world) * world
    order += order[: total - n]
    return order[rank:total:world]


def _worker_init(_):
    # Ctrl-C goes to the whole process group: workers ignore it, so the main process can finish
    # its step and write a checkpoint instead of losing its data pipeline.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(ds, batch_size: int, *, shuffle: bool, epoch: int, seed: int, rank: int, world: int,
                skip_batches: int = 0, workers: int = 0, counts: Optional[np.ndarray] = None,
                pin_memory: bool = False, min_boxes: int = 0) -> DataLoader:
    """The epoch's batches, a pure function of (seed, epoch, rank): a resumed run skips the batches
    it has done and sees exactly the rest. Evaluation uses strided shards without padding, so no
    sample counts twice. ``pin_memory`` (for a CUDA run): batches in page-locked memory, so that
    their copies to the GPU are asynchronous. ``min_boxes``: every batch is zero-padded to at least that
    many boxes (:func:`min_boxes`)."""
    if shuffle:
        indices = epoch_indices(len(ds), seed=seed, epoch=epoch, rank=rank, world=world)
        # the bucket shuffle is keyed by (seed, epoch) only: all ranks get equally many batches
        from integrations.common import step_seed

        batches = epoch_batches(indices, batch_size, counts, seed=step_seed(seed, epoch, 1))[skip_batches:]
    else:
        batches = epoch_batches(list(range(rank, len(ds), world)), batch_size)
    # own generator: creating the iterator must not consume the global RNG (exact resume)
    collate = functools.partial(collate_vqa, min_boxes=min_boxes) if min_boxes else collate_vqa
    return DataLoader(ds, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                      worker_init_fn=_worker_init if workers else None, pin_memory=pin_memory,
                      generator=seeded_generator(seed))


def load_question_types(root) -> Optional[dict]:
    """question_id -> type from a synthetic dataset's ``synth_meta.json`` (None for real data)."""
    meta = Path(root) / "synth_meta.json"
    if not meta.is_file():
        return None
    return {int(k): v for k, v in json.loads(meta.read_text(encoding="utf-8"))["question_type"].items()}


def datasets(args):
    """(dictionary, train set, val set or None with ``use_both``, the set that defines the sizes)."""
    dictionary = Dictionary.load(Path(args.data_root) / "dictionary.pkl")
    adaptive = not args.fixed36
    train_ds = VQAFeatureDataset(args.data_root, "train", dictionary, adaptive=adaptive)
    val_ds = VQAFeatureDataset(args.data_root, "val", dictionary, adaptive=adaptive)
    if args.use_both:
        return dictionary, ConcatDataset([train_ds, val_ds]), None, train_ds
    return dictionary, train_ds, val_ds, train_ds


# ---------------------------------------------------------------------------------------------
# evaluation and one training step
# ---------------------------------------------------------------------------------------------

AMP_DEVICE_TYPES = ("cpu", "cuda")      # where --amp runs (bfloat16 autocast, tested on both)


def autocast(device, amp: bool):
    """``--amp``: bfloat16 autocast on the run's device (CPU or CUDA; bfloat16 needs no loss
    scaling); no context otherwise (``torch.autocast`` refuses a device type it does not know even
    when disabled: Apple's ``mps`` before torch 2.5)."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _to(t: torch.Tensor, device) -> torch.Tensor:
    # non_blocking: from a pinned batch the copy to a GPU overlaps with the work queued before it
    return t.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device, qtypes: Optional[dict] = None, world: int = 1,
             oracle=None, amp: bool = False) -> dict:
    """Soft accuracy (and its upper bound, and per question type when known) over the whole split
    (``oracle``: the ground-truth relevance fed to an ``--oracle-relevance`` model; ``amp``: the
    forward under bfloat16 autocast, as the run was trained)."""
    was_training = model.training
    model.eval()
    names = sorted(set(qtypes.values())) if qtypes else []
    sums = torch.zeros(3 + 2 * len(names), dtype=torch.float64)  # score, bound, n, (score, n) per type
    for batch in loader:
        with autocast(device, amp):
            logits, _ = model(_to(batch.v, device), _to(batch.b, device), _to(batch.q, device), None,
                              **model_inputs(model, oracle, batch, device))
        target = _to(batch.target, device)
        s = soft_scores(logits.float(), target).double().cpu()
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


def train_step(model, optimizer, batch, device, grad_clip, oracle=None, step: int = 0, amp: bool = False):
    """One official step: forward, BCE x A, backward, clip, Adamax. Returns (loss, score sum, grad norm).
    A non-finite loss stops before the update (``step``: the number of this step, for the message).
    ``amp``: the forward under bfloat16 autocast (the loss, the gradients and the update in float32)."""
    v, b, q, target = (_to(t, device) for t in (batch.v, batch.b, batch.q, batch.target))
    with autocast(device, amp):
        logits, _ = model(v, b, q, target, **model_inputs(model, oracle, batch, device))
    logits = logits.float()
    loss = vqa_bce_loss(logits, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    finite_loss(loss.detach(), step)
    optimizer.step()
    return loss.detach(), soft_scores(logits.detach(), target).sum(), norm


# ---------------------------------------------------------------------------------------------
# the training run
# ---------------------------------------------------------------------------------------------

def run_config(args, *, world_size: int, ntoken: int, num_answers: int, v_dim: int) -> dict:
    """The settings stored in ``config.json``: the flags plus what the data and launch decide."""
    config = {k: v for k, v in vars(args).items()
              if not callable(v) and not (k in LATE_SETTINGS and v == LATE_SETTINGS[k])}
    config.update(world_size=world_size, ntoken=ntoken, num_answers=num_answers, v_dim=v_dim)
    if config.get("ban_root"):
        from .official import code_fingerprint

        # ban_root is operational (the checkout may move); the code it holds is what must not change
        config["ban_code"] = code_fingerprint(config["ban_root"])
    return config


def _same_model_code(config: dict, old: dict) -> None:
    """On --resume: refuse a switch between the official and the self-contained model, and official code
    other than the run's (a run recorded before ``ban_code`` was stored is taken at its word)."""
    if bool(old.get("ban_root")) != bool(config.get("ban_root")):
        was = (f"the official model from --ban-root {old['ban_root']}" if old.get("ban_root")
               else "the self-contained model (no --ban-root)")
        raise RunError(f"--ban-root: the run in {config['out']} was started with {was}; resume it the same way, "
                       "or start a new run with another --out or --overwrite")
    if old.get("ban_code") not in (None, config.get("ban_code")):
        raise RunError(f"--ban-root: {config['ban_root']} holds other code than the checkout the run in "
                       f"{config['out']} was started with ({old['ban_root']}); pass a checkout of that code, or "
                       "start a new run with another --out or --overwrite")


def _optimizer_state_without_frozen(state: dict, model: nn.Module) -> None:
    """Fit the Adamax state of a checkpoint written while every parameter of ``model`` was trainable to the
    optimiser built now over the trainable ones only (in place).

    Official-model runs recorded before ``build_official_ban`` froze the counter's unused ``f[8:]`` hold one
    parameter group over all parameters; those functions never got a gradient (the forward does not use
    them), so Adamax kept no state for them and dropping them renumbers the others without changing any
    update. Anything else (a group of another size, state for a dropped parameter) is left as it is, for
    :func:`~integrations.common.checkpoint.restore` to refuse."""
    opt = state.get("optimizer") if isinstance(state, dict) else None
    params = list(model.parameters())
    keep = [i for i, p in enumerate(params) if p.requires_grad]
    if not isinstance(opt, dict) or len(keep) == len(params) or len(opt.get("param_groups", [])) != 1:
        return
    group = opt["param_groups"][0]
    if list(group.get("params", [])) != list(range(len(params))):
        return
    dropped = set(range(len(params))) - set(keep)
    if any(i in dropped for i in opt.get("state", {})):
        return
    new_index = {old: new for new, old in enumerate(keep)}
    opt["state"] = {new_index[i]: v for i, v in opt.get("state", {}).items()}
    group["params"] = list(range(len(keep)))


class _Trainer:
    """Setup, one epoch, its logging and its checkpoint; the counters a checkpoint stores are
    ``epoch``, ``batch_in_epoch`` (steps done in that epoch), the epoch's running ``sums`` and ``history``."""

    def __init__(self, args, run, info, device, model, train_ds, val_ds):
        self.args, self.run, self.info, self.device = args, run, info, device
        self.model, self.train_ds, self.val_ds = model, train_ds, val_ds
        self.net = model
        if info.enabled:
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                           else None)
        self.optimizer = torch.optim.Adamax([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        if run.state is not None:
            _optimizer_state_without_frozen(run.state, model)
        ex = run.restore(model=model, optimizer=self.optimizer, rng=True)
        self.epoch, self.skip = int(ex.get("epoch", 0)), int(ex.get("batch_in_epoch", 0))
        self.step, self.history = run.start_step, list(ex.get("history", []))
        self.sums = list(ex.get("sums", [0.0, 0.0, 0]))       # loss x n, score, n of the current epoch
        self.local_batch = args.batch_size // info.world_size
        self.steps_per_epoch = math.ceil(math.ceil(len(train_ds) / info.world_size) / self.local_batch)
        self.qtypes = load_question_types(args.data_root)
        self.counts = box_counts(train_ds) if args.bucket else None
        self.monitor = PermutationMonitor(model)       # eta and permutation entropy (none for off / none)
        self.oracle = relevance_oracle(args)
        if run.state is not None and info.is_main:
            print(f"resumed from step {self.step} (epoch {self.epoch}, batch {self.skip}; {run.state['path']})",
                  flush=True)

    def checkpoint(self, batch_in_epoch: int):
        return self.run.save(self.step, model=self.model, optimizer=self.optimizer,
                             extra={"epoch": self.epoch, "batch_in_epoch": batch_in_epoch, "sums": self.sums,
                                    "history": self.history})

    def done(self) -> bool:
        return self.epoch >= self.args.epochs or (self.args.max_steps is not None and self.step >= self.args.max_steps)

    def train_epoch(self) -> int:
        """Steps of the current epoch until its end or ``--max-steps``; returns the batch index reached."""
        args, info = self.args, self.info
        lr = official_lr(self.epoch, args.lr, args.warmup, args.lr_decay_start, args.lr_decay_every, args.lr_decay_rate)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loader = make_loader(self.train_ds, self.local_batch, shuffle=True, epoch=self.epoch, seed=args.seed,
                             rank=info.rank, world=info.world_size, skip_batches=self.skip, workers=args.workers,
                             counts=self.counts, pin_memory=self.device.type == "cuda", min_boxes=min_boxes(args))
        self.net.train()
        bar = progress(total=self.steps_per_epoch, initial=self.skip, desc=f"{args.permutation} epoch {self.epoch}",
                       disable=None if info.is_main else True)
        i = self.skip
        try:
            for batch in loader:
                t0 = time.perf_counter()
                loss, score, norm = train_step(self.net, self.optimizer, batch, self.device, args.grad_clip,
                                               self.oracle, step=self.step + 1, amp=setting(args, "amp"))
                stats = self._reduce(torch.tensor([loss.item() * len(batch.q), score.item(), len(batch.q)],
                                                  dtype=torch.float64))
                self.sums = [self.sums[0] + float(stats[0]), self.sums[1] + float(stats[1]), self.sums[2] + int(stats[2])]
                self.step, i = self.step + 1, i + 1
                self.log_step(stats, lr, norm, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{self.sums[0] / self.sums[2]:.3f}", acc=f"{100 * self.sums[1] / self.sums[2]:.1f}")
                bar.update(1)
                self.run.interrupt(self.step, lambda: self.checkpoint(i))
                if args.max_steps is not None and self.step >= args.max_steps:
                    break
        finally:
            bar.close()
        return i

    def _reduce(self, stats: torch.Tensor) -> torch.Tensor:
        if self.info.enabled:  # epoch metrics over all ranks (the loss itself is already averaged by DDP)
            stats = stats.to(self.device)
            dist.all_reduce(stats)
            stats = stats.cpu()
        return stats

    def log_step(self, stats, lr: float, norm, seconds: float) -> None:
        writer = self.run.writer
        if writer is None or self.step % self.args.log_every:
            return
        writer.add_scalar("train/loss", float(stats[0] / stats[2]), self.step)
        writer.add_scalar("train/soft_acc", float(stats[1] / stats[2]), self.step)
        writer.add_scalar("train/lr", lr, self.step)
        writer.add_scalar("train/grad_norm", float(norm), self.step)
        writer.add_scalar("time/step_s", seconds, self.step)
        self.monitor.log(writer, self.step)

    def end_epoch(self, lr: float) -> dict:
        """Validation, the epoch's record in the history, TensorBoard, a line, and a checkpoint."""
        args, info = self.args, self.info
        record = {"epoch": self.epoch, "step": self.step, "lr": lr, "train_loss": self.sums[0] / self.sums[2],
                  "train_soft_acc": self.sums[1] / self.sums[2],
                  **self.monitor.values()}            # eta and the last training batch's permutation entropy
        if self.val_ds is not None:
            val_loader = make_loader(self.val_ds, self.local_batch, shuffle=False, epoch=0, seed=args.seed,
                                     rank=info.rank, world=info.world_size, workers=args.workers,
                                     pin_memory=self.device.type == "cuda", min_boxes=min_boxes(args))
            ev = evaluate(self.model, val_loader, self.device, self.qtypes, info.world_size, self.oracle,
                          amp=setting(args, "amp"))
            record.update({f"val_{k}": v for k, v in ev.items()})
        self.history.append(record)
        writer = self.run.writer
        if writer is not None:
            writer.add_scalar("epoch/train_loss", record["train_loss"], self.step)
            writer.add_scalar("epoch/train_soft_acc", record["train_soft_acc"], self.step)
            for k, v in record.items():
                if k.startswith("val_") and k != "val_n":
                    writer.add_scalar("epoch/" + k.replace("val_", "val/"), v, self.step)
        if info.is_main:
            msg = f"epoch {self.epoch}: loss {record['train_loss']:.4f} train acc {100 * record['train_soft_acc']:.2f}"
            if "val_soft_acc" in record:
                msg += f" val acc {100 * record['val_soft_acc']:.2f} (bound {100 * record['val_upper_bound']:.2f})"
            print(msg, flush=True)
        self.epoch, self.skip, self.sums = self.epoch + 1, 0, [0.0, 0.0, 0]
        self.checkpoint(0)
        return record


def run(args) -> dict:
    """Train as configured (the parsed ``train`` flags). Returns ``{"history", "step", "model",
    "finished", "out"}``; a finished run with the same settings is not touched (its record is returned)."""
    device = resolve_device(args.device)
    if setting(args, "amp") and device.type not in AMP_DEVICE_TYPES:
        raise CommandError(f"--amp: bfloat16 autocast runs on the CPU and CUDA, not on {device.type!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ban_root:
        args.ban_root = ban_root_path(args.ban_root)      # stored absolute: the run does not depend on the cwd
    info = init_distributed(device)
    try:
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        if args.batch_size % info.world_size:
            raise CommandError(f"--batch-size: {args.batch_size} is not divisible by the {info.world_size} processes")
        seed_everything(args.seed)  # same on every rank: identical initial weights (DDP also broadcasts them)
        dictionary, train_ds, val_ds, ref = datasets(args)
        if args.permutation == "po-la" and setting(args, "num_positions") is None:
            # PO-LA's linear start has one learned vector per position: as many as the largest image has boxes
            args.num_positions = int(max(box_counts(d).max() for d in (train_ds, val_ds) if d is not None))
        # built before the run folder is touched: a checkout (or setting) that cannot build the model leaves
        # no run behind that a corrected command would have to --overwrite
        model = build_model(args, dictionary.ntoken, ref.num_ans_candidates, ref.v_dim)
        config = run_config(args, world_size=info.world_size, ntoken=dictionary.ntoken,
                            num_answers=ref.num_ans_candidates, v_dim=ref.v_dim)
        run_ = open_run(args.out, config, resume=args.resume, overwrite=args.overwrite,
                        may_change=_MAY_CHANGE, validate=functools.partial(_same_model_code, config),
                        log=print if info.is_main else (lambda s: None))
        if run_.finished:
            if info.is_main:
                print(f"{run_.path} holds this finished run; nothing to do")
            return {**run_.summary, "model": None, "out": str(run_.path)}
        model = model.to(device)
        trainer = _Trainer(args, run_, info, device, model, train_ds, val_ds)
        try:
            with run_.interruptible():
                _loop(trainer)
        finally:
            run_.close()
        finished = trainer.epoch >= args.epochs
        record = {"history": trainer.history, "step": trainer.step, "finished": finished}
        if finished:
            run_.finish(record)
        else:
            run_.write_json("summary.json", {**record, "config": run_.config})
        return {**record, "model": model, "out": str(run_.path)}
    finally:
        # the trainer's DistributedDataParallel wrapper (its reducer holds the process group) goes
        # before the group does, not whenever the garbage collector or the interpreter's exit gets to it
        trainer = None
        if info.enabled:
            gc.collect()
        cleanup_distributed()


def _loop(trainer: _Trainer) -> None:
    args = trainer.args
    while not trainer.done():
        lr = official_lr(trainer.epoch, args.lr, args.warmup, args.lr_decay_start, args.lr_decay_every,
                         args.lr_decay_rate)
        reached = trainer.train_epoch()
        if reached < trainer.steps_per_epoch:              # stopped mid-epoch by --max-steps
            trainer.checkpoint(reached)
            trainer.skip = reached
        else:
            trainer.end_epoch(lr)
    if trainer.epoch < args.epochs and trainer.info.is_main:   # --max-steps, mid-epoch or at an epoch's end
        print(f"stopped by --max-steps at step {trainer.step} (epoch {trainer.epoch}, batch "
              f"{trainer.skip}/{trainer.steps_per_epoch}); continue with --resume", flush=True)


# ---------------------------------------------------------------------------------------------
# evaluation of a finished (or interrupted) run
# ---------------------------------------------------------------------------------------------

# what load_run rebuilds a model and its data from (a checkpoint of another integration lacks them)
_RUN_KEYS = ("data_root", "fixed36", "permutation", "num_hid", "gamma", "op", "tfidf", "batch_size", "seed")


def load_run(run_dir, split: str, data_root: Optional[str], device, ban_root: Optional[str] = None) -> tuple:
    """``(model, dataset, stored config, checkpoint state)`` of a run's newest intact checkpoint: the model
    on ``device`` in eval mode, the dataset of ``split``; every model and data setting comes from the
    run's stored config (``data_root``: the data elsewhere; ``ban_root``: the official checkout elsewhere,
    see :func:`official_checkout`)."""
    from integrations.common import load_latest

    state = load_latest(run_dir)
    saved = argparse.Namespace(**checkpoint_config(state, "BAN", _RUN_KEYS, choice=("permutation", PERMUTATIONS),
                                                   run=run_dir))
    if data_root is not None:
        saved.data_root = data_root
    official_checkout(saved, ban_root, run_dir)
    dictionary = Dictionary.load(Path(saved.data_root) / "dictionary.pkl")
    ds = VQAFeatureDataset(saved.data_root, split, dictionary, adaptive=not saved.fixed36)
    model = build_model(saved, dictionary.ntoken, ds.num_ans_candidates, ds.v_dim)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), ds, saved, state


def official_checkout(saved: argparse.Namespace, ban_root: Optional[str], run_dir) -> None:
    """Point a stored config of an official-model run at the checkout to rebuild its model from: ``ban_root``,
    or the stored path when None; either must hold the code the run was trained with (its ``ban_code``), as
    on ``--resume``. CommandError naming ``--ban-root`` otherwise, and for ``ban_root`` given to a run of the
    self-contained model."""
    from .official import check_root, code_fingerprint

    stored = getattr(saved, "ban_root", None)
    if not stored:
        if ban_root is not None:
            raise CommandError(f"--ban-root: {run_dir} was trained with the self-contained model (no --ban-root); "
                               "leave the flag out")
        return
    if ban_root is not None:
        saved.ban_root = ban_root_path(ban_root)
    else:
        try:
            check_root(stored)
        except (OSError, ValueError):
            raise CommandError(f"--ban-root: {run_dir} was trained with the official model from {stored}, which is "
                               "not a jnhwkim/ban-vqa checkout any more; pass --ban-root with a checkout of the same "
                               "code") from None
    code = getattr(saved, "ban_code", None)
    if code is not None and code_fingerprint(saved.ban_root) != code:
        raise CommandError(f"--ban-root: {saved.ban_root} holds other code than the checkout {run_dir} was trained "
                           f"with ({stored}); pass a checkout of that code")


def _run_on_split(run_dir, split: str, data_root: Optional[str], device: str, batch_size: Optional[int],
                  workers: int, ban_root: Optional[str]) -> tuple:
    """``(model, loader, device, stored config, checkpoint state)`` to run a trained run's newest intact
    checkpoint over ``split`` in order, as it was trained (its box padding, ``--amp``); for ``evaluate_run``
    and ``predict_run``."""
    dev = resolve_device(device)
    model, ds, saved, state = load_run(run_dir, split, data_root, dev, ban_root)
    if setting(saved, "amp") and dev.type not in AMP_DEVICE_TYPES:
        raise CommandError(f"--device {device}: {run_dir} was trained with --amp and is evaluated under the same "
                           f"bfloat16 autocast, which runs on the CPU and CUDA only")
    loader = make_loader(ds, batch_size or saved.batch_size, shuffle=False, epoch=0, seed=saved.seed, rank=0,
                         world=1, workers=workers, pin_memory=dev.type == "cuda", min_boxes=min_boxes(saved))
    return model, loader, dev, saved, state


def evaluate_run(run_dir, *, split: str = "val", data_root: Optional[str] = None, device: str = "cpu",
                 batch_size: Optional[int] = None, workers: int = 0, ban_root: Optional[str] = None) -> dict:
    """Soft accuracy (overall, upper bound, per question type) of a run's newest intact checkpoint on
    ``split`` (:func:`load_run`; ``ban_root``: the official checkout when it has moved)."""
    if split.startswith("test"):
        # the official test splits ship without answers (no cache/<split>_target.pkl): nothing to score
        raise CommandError(f"--split {split}: the test splits have no answers to score against; evaluate on "
                           f"{' or '.join(s for s in QUESTION_FILES if not s.startswith('test'))}, or write "
                           f"the answers for the evaluation server with predict")
    model, loader, dev, saved, state = _run_on_split(run_dir, split, data_root, device, batch_size, workers, ban_root)
    out = evaluate(model, loader, dev, load_question_types(saved.data_root), oracle=relevance_oracle(saved),
                   amp=setting(saved, "amp"))
    return {**out, "split": split, "checkpoint": state["path"], "step": int(state["step"])}


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device, label2ans, oracle=None, amp: bool = False) -> list:
    """The answer of highest logit for every question of ``loader``, ``[{"question_id", "answer"}]`` in its
    order: the results format of the VQA evaluation server (and of the official ``test.py``)."""
    was_training = model.training
    model.eval()
    answers = []
    for batch in loader:
        with autocast(device, amp):
            logits, _ = model(_to(batch.v, device), _to(batch.b, device), _to(batch.q, device), None,
                              **model_inputs(model, oracle, batch, device))
        best = logits.float().argmax(1).tolist()
        answers += [{"question_id": int(q), "answer": label2ans[a]} for q, a in zip(batch.question_id.tolist(), best)]
    model.train(was_training)
    return answers


def predict_run(run_dir, *, split: str = "test-dev2015", data_root: Optional[str] = None, device: str = "cpu",
                batch_size: Optional[int] = None, workers: int = 0, ban_root: Optional[str] = None) -> dict:
    """The answers of a run's newest intact checkpoint to every question of ``split`` (:func:`predict`), with the
    checkpoint and step they come from: ``{"split", "checkpoint", "step", "answers"}``."""
    model, loader, dev, saved, state = _run_on_split(run_dir, split, data_root, device, batch_size, workers, ban_root)
    answers = predict(model, loader, dev, loader.dataset.label2ans, oracle=relevance_oracle(saved),
                      amp=setting(saved, "amp"))
    return {"split": split, "checkpoint": state["path"], "step": int(state["step"]), "answers": answers}
