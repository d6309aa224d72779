"""Training and evaluation of the mosaic tasks (paper sections 4.2-4.3, appendices F.2, F.3, G).

Tasks:
* ``mosaic``   explicit: MSE between the softly permuted tiles and the correctly assembled image;
               evaluated with the Hungarian assignment (Tables 1 and 4).
* ``pretrain`` the ResNet-18 of the implicit task, trained on the original (resized) images.
* ``classify`` implicit: the frozen pre-trained ResNet-18 classifies the softly re-assembled image and
               only the permutation module is trained with cross-entropy; evaluated with soft
               assignments as the released code does (Tables 2 and 5), with the *max* (original images)
               and *min* (randomly shuffled tiles) rows.

Every run directory holds ``config.json`` (resolved), ``checkpoints/step_*.pt`` (with the config,
model, optimiser, RNG state, epoch/batch position and history: resume is exact), ``tb/`` and
``summary.json`` (final test metrics and the per-epoch history). Runs follow the shared lifecycle of
``integrations.common`` (README "Runs").
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import setperm
from integrations.common import (CommandError, data_root, finite_loss, generator, load_latest, open_run, progress,
                                 seed_everything)
from integrations.common.cli import checkpoint_config
from integrations.common.datasets import NUM_CLASSES, channel_stats, load_split

from .model import ClassifyNet, MosaicNet
from .resnet import ResNet18
from .tiles import assemble, gather_positions, prepare_images, random_permutations, shuffle_tiles, target_index, to_tiles

# The settings that load_run and the evaluation read from a mosaic run's stored config.
_RUN_KEYS = ("task", "dataset", "tiles", "permutation", "steps", "conv_channels", "cost_hidden", "sinkhorn_iters",
             "logit_clip", "resnet_width", "data_root", "test_subset")

EVAL_SEED = 20190506  # fixed test-set shuffles, identical for every model, so rows of a table are comparable


# ------------------------------------------------------------------------------------------- data
@dataclass
class MosaicData:
    """Images already prepared for n x n tiles: float (B, C, S, S), normalised; labels (B,)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    n: int

    @property
    def channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def tile_size(self) -> int:
        return self.train_x.shape[-1] // self.n

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> [0, 1] for figures and TensorBoard."""
        return (x * self.std.view(1, -1, 1, 1) + self.mean.view(1, -1, 1, 1)).clamp(0, 1)


def load_data(cfg) -> MosaicData:
    root = data_root(cfg.data_root)
    train = load_split(cfg.dataset, "train", root)
    test = load_split(cfg.dataset, "test", root)
    mean, std = channel_stats(train.images)  # statistics of the whole training split (F.2)
    train, test = train.take(cfg.subset), test.take(cfg.test_subset)
    return MosaicData(prepare_images(train.images, cfg.tiles, mean, std), train.labels,
                      prepare_images(test.images, cfg.tiles, mean, std), test.labels, mean, std, cfg.tiles)


def batch_tiles(images: torch.Tensor, n: int, generator: torch.Generator):
    """images (B, C, S, S) -> (shuffled tiles, target tiles (B, N, C, h, w), perm (B, N))."""
    target = to_tiles(images, n)
    perm = random_permutations(images.shape[0], n * n, generator)
    return shuffle_tiles(target, perm), target, perm


def _gen(*keys: int) -> torch.Generator:
    # One generator per (seed, epoch, batch): the data order and tile shuffles do not depend on the
    # global RNG, so a resumed run sees exactly the batches it would have seen.
    return generator(*keys)


# ------------------------------------------------------------------------------------------ models
def default_logit_clip(cfg) -> Optional[float]:
    """Paper F.3: LinAssign logits are clipped to [-10, 10] before Sinkhorn (NaNs otherwise); the released
    code also clips the PO-LA initial logits on ImageNet and in the classification task."""
    if cfg.logit_clip is not None:
        return cfg.logit_clip if cfg.logit_clip > 0 else None
    if cfg.permutation == "linassign" or (cfg.permutation == "po-la" and (cfg.task == "classify" or cfg.dataset == "tiny-imagenet")):
        return 10.0
    return None


def build_mosaic(cfg, channels: int, tile_size: int) -> MosaicNet:
    return MosaicNet(cfg.tiles, channels, tile_size, cfg.permutation, steps=cfg.steps, conv_channels=cfg.conv_channels,
                     cost_hidden=cfg.cost_hidden, logit_clip=default_logit_clip(cfg),
                     sinkhorn_iters=cfg.sinkhorn_iters, kernel=getattr(cfg, "kernel", "auto"))


def build_classifier(cfg, channels: int) -> ResNet18:
    return ResNet18(channels, NUM_CLASSES[cfg.dataset], small_input=cfg.dataset != "tiny-imagenet",
                    width=cfg.resnet_width)


def load_classifier(path: str, cfg, channels: int) -> ResNet18:
    """The pre-trained ResNet-18 of a ``--task pretrain`` run (its folder or a checkpoint file)."""
    state = load_latest(path)
    p, pc = state["path"], state["config"]
    if pc.get("task") != "pretrain":
        raise CommandError(f"--classifier: {p} is a {pc.get('task')!r} checkpoint, expected a 'pretrain' one")
    # the dataset and the tile count fix the image size the ResNet was trained at
    for key in ("dataset", "tiles"):
        if pc.get(key) != getattr(cfg, key):
            raise CommandError(f"--classifier: {p} was trained with {key}={pc.get(key)!r}, this run has {getattr(cfg, key)!r}")
    net = ResNet18(channels, NUM_CLASSES[pc["dataset"]], small_input=pc["dataset"] != "tiny-imagenet",
                   width=pc["resnet_width"])
    net.load_state_dict(state["model"])
    return net


def resolve_classifier(cfg) -> None:
    """classify: set ``cfg.resnet_width`` to the width of the ``--classifier`` ResNet-18, which is the one
    built (config.json then records it); an explicit ``--resnet-width`` that differs is refused. Warns in
    one line when that checkpoint is not the end of its pretrain run."""
    state = load_latest(cfg.classifier)
    p, pc, extra = state["path"], state["config"], state.get("extra", {})
    if pc.get("task") != "pretrain":
        raise CommandError(f"--classifier: {p} is a {pc.get('task')!r} checkpoint, expected a 'pretrain' one")
    width = int(pc["resnet_width"])
    if cfg.resnet_width is not None and cfg.resnet_width != width:
        raise CommandError(f"--resnet-width {cfg.resnet_width}: the --classifier ResNet-18 ({p}) has width {width}; "
                           f"leave --resnet-width out or give {width}")
    cfg.resnet_width = width
    # a checkpoint at the end of an epoch stores (next epoch, batch 0): the last one has epoch == epochs
    epoch, batch, epochs = int(extra.get("epoch", 0)), int(extra.get("batch", 0)), int(pc.get("epochs", 0))
    if epoch < epochs or batch:
        print(f"warning: --classifier {p} is at epoch {epoch} (batch {batch}) of {epochs}: its pretrain run is not "
              f"finished, so the frozen ResNet-18 may be undertrained (finish it with --resume)",
              file=sys.stderr, flush=True)


def build_model(cfg, data: MosaicData):
    if cfg.task == "pretrain":
        return build_classifier(cfg, data.channels)
    mosaic = build_mosaic(cfg, data.channels, data.tile_size)
    if cfg.task == "mosaic":
        return mosaic
    if not cfg.classifier:
        raise CommandError("--classifier: the classify task needs the run folder of a '--task pretrain' run")
    return ClassifyNet(mosaic, load_classifier(cfg.classifier, cfg, data.channels))


# --------------------------------------------------------------------------------------- evaluation
class _Sums:
    """Running sums of per-image metrics over the test split."""

    def __init__(self):
        self.sums: dict = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(values.double().sum())

    def means(self, count: int) -> dict:
        return {k: v / count for k, v in self.sums.items()}


def _test_batches(cfg, data: MosaicData, device, batch_size: int):
    """(x, y, shuffled, target, perm) over the test split, on fixed shuffles shared by every model."""
    g = _gen(EVAL_SEED, cfg.tiles)
    for i in range(0, data.test_x.shape[0], batch_size):
        x, y = data.test_x[i: i + batch_size], data.test_y[i: i + batch_size]
        shuffled, target, perm = batch_tiles(x, cfg.tiles, g)
        yield x.to(device), y.to(device), shuffled.to(device), target.to(device), perm.to(device)


def _reconstruction_metrics(sums: _Sums, mosaic: MosaicNet, shuffled, target, perm):
    """Table 1 / 4 metrics of one batch; returns (soft, hard) reconstructions."""
    P = mosaic.permutation(shuffled)
    soft = setperm.functional.apply_permutation(shuffled, P)
    sums.add("mse_soft", (soft - target).pow(2).flatten(1).mean(1))
    idx = setperm.functional.hungarian(P).to(shuffled.device)
    hard = gather_positions(shuffled, idx)
    sums.add("mse", (hard - target).pow(2).flatten(1).mean(1))
    sums.add("acc_perm", (idx == target_index(perm)).all(1))
    sums.add("acc_pixel", (hard == target).flatten(1).all(1))
    return soft, hard


def evaluate_mosaic(cfg, model: MosaicNet, data: MosaicData, device, batch_size: int = 250) -> dict:
    """Explicit task: mse (Hungarian reconstruction, Table 1), acc_perm (every tile at its position,
    Table 4), acc_pixel (reconstruction identical pixel for pixel: identical tiles may be swapped),
    mse_soft (before Hungarian), eta."""
    sums, count = _Sums(), 0
    for _, _, shuffled, target, perm in _test_batches(cfg, data, device, batch_size):
        _reconstruction_metrics(sums, model, shuffled, target, perm)
        count += shuffled.shape[0]
    return {**sums.means(count), "n_test": count, "eta": _eta(model)}


def evaluate_classify(cfg, model: ClassifyNet, data: MosaicData, device, batch_size: int = 250) -> dict:
    """Implicit task: acc (soft assignment, Table 2), mse_soft (Table 5), the acc_max / acc_min / mse_min
    rows, the Hungarian acc_hard / acc_perm / mse for reference, eta."""
    sums, count, clf = _Sums(), 0, model.classifier
    for x, y, shuffled, target, perm in _test_batches(cfg, data, device, batch_size):
        soft, hard = _reconstruction_metrics(sums, model.mosaic, shuffled, target, perm)
        sums.add("acc", clf(assemble(soft, cfg.tiles)).argmax(1) == y)        # soft assignments, as released
        sums.add("acc_hard", clf(assemble(hard, cfg.tiles)).argmax(1) == y)
        sums.add("acc_max", clf(x).argmax(1) == y)
        sums.add("acc_min", clf(assemble(shuffled, cfg.tiles)).argmax(1) == y)
        sums.add("mse_min", (shuffled - target).pow(2).flatten(1).mean(1))   # Table 5 *min* row
        count += x.shape[0]
    return {**sums.means(count), "n_test": count, "eta": _eta(model)}


def evaluate_pretrain(cfg, model: ResNet18, data: MosaicData, device, batch_size: int = 250) -> dict:
    """The ResNet of the implicit task: acc on the original images (*max*), acc_min on shuffled tiles."""
    sums, count = _Sums(), 0
    for x, y, shuffled, _, _ in _test_batches(cfg, data, device, batch_size):
        sums.add("acc", model(x).argmax(1) == y)
        sums.add("acc_min", model(assemble(shuffled, cfg.tiles)).argmax(1) == y)
        count += x.shape[0]
    return {**sums.means(count), "n_test": count}


_EVALUATORS = {"mosaic": evaluate_mosaic, "classify": evaluate_classify, "pretrain": evaluate_pretrain}


@torch.no_grad()
def evaluate(cfg, model, data: MosaicData, device, batch_size: int = 250) -> dict:
    """Test-set metrics of the task ``cfg.task`` on fixed random shuffles (the same for every model)."""
    model.eval()
    return _EVALUATORS[cfg.task](cfg, model, data, device, batch_size)


def _eta(model) -> Optional[float]:
    m = model.mosaic if isinstance(model, ClassifyNet) else model
    if isinstance(m, MosaicNet) and getattr(m.po, "eta", None) is not None:
        return float(m.po.eta)
    return None


@torch.no_grad()
def log_samples(writer, cfg, model, data: MosaicData, device, step: int, k: int = 8) -> None:
    """TensorBoard images: shuffled input, soft and Hungarian reconstructions, target (first k test images)."""
    if cfg.task == "pretrain":
        return
    model.eval()
    x = data.test_x[:k].to(device)
    shuffled, target, _ = batch_tiles(x, cfg.tiles, _gen(EVAL_SEED, cfg.tiles))
    mosaic = model.mosaic if cfg.task == "classify" else model
    P = mosaic.permutation(shuffled)
    soft = setperm.functional.apply_permutation(shuffled, P)
    hard = gather_positions(shuffled, setperm.functional.hungarian(P).to(device))
    for name, t in (("shuffled", shuffled), ("soft", soft), ("hungarian", hard), ("target", target)):
        writer.add_images(f"samples/{name}", data.denormalise(assemble(t, cfg.tiles).cpu()), step)


# ----------------------------------------------------------------------------------------- training
# Settings that only say how long to train: they may grow on --resume.
_MAY_CHANGE = ("epochs",)


def _loss(cfg, model, x, y, shuffled, target):
    if cfg.task == "pretrain":
        return F.cross_entropy(model(x), y), {}
    if cfg.task == "mosaic":
        recon, _ = model(shuffled)
        return F.mse_loss(recon, target), {}
    logits, recon, _ = model(shuffled)
    with torch.no_grad():
        mse = F.mse_loss(recon, target)
    return F.cross_entropy(logits, y), {"mse_soft": float(mse)}


def run_config(cfg) -> dict:
    """The settings stored in ``config.json`` (everything the CLI resolved)."""
    return {k: v for k, v in vars(cfg).items() if not callable(v)}


class _Trainer:
    """One run: data, model, optimiser and the counters a checkpoint stores (epoch, batch, step, history)."""

    def __init__(self, cfg, run, data: MosaicData, model: nn.Module, load_seconds: float):
        self.cfg, self.run = cfg, run
        self.device = torch.device(cfg.device)
        self.data, self.model, self.load_seconds = data, model, load_seconds
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr)
        ex = run.restore(model=self.model, optimizer=self.opt)
        self.epoch, self.batch = int(ex.get("epoch", 0)), int(ex.get("batch", 0))
        self.step, self.history = run.start_step, list(ex.get("history", []))
        self.train_seconds = float(ex.get("train_seconds", 0.0))
        self.per_epoch = math.ceil(self.data.train_x.shape[0] / cfg.batch_size)
        if run.state is not None:
            print(f"resumed from step {self.step} (epoch {self.epoch}, batch {self.batch}; {run.state['path']})")

    def checkpoint(self, epoch: int, batch: int):
        return self.run.save(self.step, model=self.model, optimizer=self.opt,
                             extra={"epoch": epoch, "batch": batch, "history": self.history,
                                    "train_seconds": self.train_seconds})

    def train_epoch(self) -> None:
        cfg, data = self.cfg, self.data
        self.model.train()
        order = torch.randperm(data.train_x.shape[0], generator=_gen(cfg.seed, self.epoch))
        bar = progress(range(self.batch, self.per_epoch), total=self.per_epoch, initial=self.batch,
                       desc=f"{cfg.task} {cfg.dataset} {cfg.tiles}x{cfg.tiles} {cfg.permutation} "
                            f"ep {self.epoch + 1}/{cfg.epochs}")
        t0 = time.perf_counter()
        try:
            for j in bar:
                idx = order[j * cfg.batch_size: (j + 1) * cfg.batch_size]
                x, y = data.train_x[idx].to(self.device), data.train_y[idx].to(self.device)
                shuffled, target, _ = batch_tiles(x, cfg.tiles, _gen(cfg.seed, self.epoch, j))
                loss, extra = _loss(cfg, self.model, x, y, shuffled.to(self.device), target.to(self.device))
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                lv = finite_loss(loss.detach(), self.step + 1, f"epoch {self.epoch}, batch {j}")
                self.opt.step()
                self.step += 1
                self.log_step(lv, extra)
                bar.set_postfix(loss=f"{lv:.4f}")
                self.train_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.checkpoint(self.epoch, j + 1)
                self.run.interrupt(self.step, lambda: self.checkpoint(self.epoch, j + 1))
        finally:
            bar.close()

    def log_step(self, loss: float, extra: dict) -> None:
        writer = self.run.writer
        if self.step % self.cfg.log_every or writer is None:
            return
        writer.add_scalar("train/loss", loss, self.step)
        for k, v in extra.items():
            writer.add_scalar(f"train/{k}", v, self.step)
        if self.cfg.task != "pretrain":
            with setperm.PermutationMonitor(self.model) as monitor:
                for name, eta in monitor.step_sizes().items():
                    writer.add_scalar(f"eta/{name}", eta, self.step)

    def end_epoch(self) -> dict:
        metrics = evaluate(self.cfg, self.model, self.data, self.device)
        metrics.update(epoch=self.epoch + 1, step=self.step, train_seconds=round(self.train_seconds, 1))
        self.history.append(metrics)
        writer = self.run.writer
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, float) and k != "train_seconds":
                    writer.add_scalar(f"test/{k}", v, self.step)
            log_samples(writer, self.cfg, self.model, self.data, self.device, self.step)
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}), flush=True)
        self.epoch, self.batch = self.epoch + 1, 0
        self.checkpoint(self.epoch, 0)
        return metrics


def train(cfg) -> dict:
    """Train as configured (an argparse Namespace, see ``__main__``); return the run's summary
    ``{"final": test metrics of the last epoch, "history": per-epoch metrics, ...}``.

    A finished run with the same settings is left as it is and its summary returned."""
    # Data and model first: a missing data folder or a wrong --classifier is reported before the
    # run folder is created or changed.
    torch.set_num_threads(cfg.threads)
    if cfg.task == "classify" and cfg.classifier:
        resolve_classifier(cfg)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    data = load_data(cfg)
    load_seconds = time.perf_counter() - t0
    model = build_model(cfg, data).to(torch.device(cfg.device))
    # the mosaic task builds no ResNet-18: its recorded width is not a setting of the run (a run started
    # before --resnet-width was refused there recorded the width it was given)
    may_change = _MAY_CHANGE + (("resnet_width",) if cfg.task == "mosaic" else ())
    run = open_run(cfg.out, run_config(cfg), resume=cfg.resume, overwrite=cfg.overwrite, may_change=may_change)
    if run.finished:
        print(f"{run.path} holds this finished run; nothing to do")
        return run.summary
    trainer = _Trainer(cfg, run, data, model, load_seconds)
    try:
        with run.interruptible():
            while trainer.epoch < cfg.epochs:
                trainer.train_epoch()
                trainer.end_epoch()
    finally:
        run.close()
    final = dict(trainer.history[-1]) if trainer.history else {}
    summary = {"final": final, "history": trainer.history, "load_seconds": round(trainer.load_seconds, 1),
               "n_train": int(trainer.data.train_x.shape[0]), "n_test": int(trainer.data.test_x.shape[0])}
    run.finish(summary)
    return run.summary if run.summary else {**summary, "finished": True}


def load_run(run_dir, *, data_root_flag: Optional[str] = None, test_subset: Optional[int] = None):
    """(settings, model with the newest intact checkpoint's weights, test data) of a run folder.

    Every data setting comes from the run's stored config; ``data_root_flag`` (the ``--data-root``
    flag) replaces the stored data folder only when given, ``test_subset`` the stored test subset."""
    state = load_latest(run_dir)
    stored = checkpoint_config(state, "mosaic", _RUN_KEYS, choice=("task", tuple(_EVALUATORS)), run=run_dir)
    saved = argparse.Namespace(**stored)
    if data_root_flag is not None:
        saved.data_root = data_root_flag
    if test_subset is not None:
        saved.test_subset = test_subset
    saved.subset = 1                      # the training images are only needed for their statistics
    data = load_data(saved)
    if saved.task == "classify":
        # The checkpoint holds the frozen ResNet-18 too (width recorded in the config), so the
        # --classifier run it was copied from is not read again: it may have moved, been continued
        # or replaced since, or its stored path may be relative to another working directory.
        model = ClassifyNet(build_mosaic(saved, data.channels, data.tile_size), build_classifier(saved, data.channels))
    else:
        model = build_model(saved, data)
    model.load_state_dict(state["model"])
    return saved, model, data, state["path"]
