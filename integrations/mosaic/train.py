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
``metrics.json``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import setperm
from integrations.common import RunDir, latest_checkpoint, load_checkpoint, progress, save_checkpoint, seed_everything

from .datasets import NUM_CLASSES, load_split, channel_stats
from .model import ClassifyNet, MosaicNet
from .resnet import ResNet18
from .tiles import assemble, gather_positions, prepare_images, random_permutations, shuffle_tiles, target_index, to_tiles

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
    train = load_split(cfg.dataset, "train", cfg.data_root)
    test = load_split(cfg.dataset, "test", cfg.data_root)
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
    g = torch.Generator()
    g.manual_seed(hash(tuple(keys)) % (2**63))
    return g


# ------------------------------------------------------------------------------------------ models
def default_logit_clip(cfg) -> Optional[float]:
    """Paper F.3: LinAssign logits are clipped to [-10, 10] before Sinkhorn (NaNs otherwise); the released
    code also clips the PO-LA initial logits on ImageNet and in the classification task."""
    if cfg.logit_clip is not None:
        return cfg.logit_clip if cfg.logit_clip > 0 else None
    if cfg.model == "linassign" or (cfg.model == "po-la" and (cfg.task == "classify" or cfg.dataset == "tiny-imagenet")):
        return 10.0
    return None


def build_mosaic(cfg, channels: int, tile_size: int) -> MosaicNet:
    return MosaicNet(cfg.tiles, channels, tile_size, cfg.model, steps=cfg.steps, conv_channels=cfg.conv_channels,
                     cost_hidden=cfg.cost_hidden, logit_clip=default_logit_clip(cfg),
                     sinkhorn_iters=cfg.sinkhorn_iters, kernel=getattr(cfg, "kernel", "chunked"))


def build_classifier(cfg, channels: int) -> ResNet18:
    return ResNet18(channels, NUM_CLASSES[cfg.dataset], small_input=cfg.dataset != "tiny-imagenet",
                    width=cfg.resnet_width)


def load_classifier(path: str, cfg, channels: int) -> ResNet18:
    """The pre-trained ResNet-18 of a ``--task pretrain`` run (its folder or a checkpoint file)."""
    p = Path(path)
    if p.is_dir():
        found = latest_checkpoint(p / "checkpoints") if (p / "checkpoints").is_dir() else latest_checkpoint(p)
        if found is None:
            raise FileNotFoundError(f"--classifier: no checkpoint in {p}")
        p = found
    state = torch.load(p, map_location="cpu", weights_only=False)
    pc = state["config"]
    if pc.get("task") != "pretrain":
        raise ValueError(f"--classifier: {p} is a {pc.get('task')!r} checkpoint, expected a 'pretrain' one")
    for key in ("dataset", "tiles_size"):
        if key in pc and pc[key] != getattr(cfg, key, pc[key]):
            raise ValueError(f"--classifier: {p} was trained with {key}={pc[key]!r}, this run has {getattr(cfg, key)!r}")
    net = ResNet18(channels, NUM_CLASSES[pc["dataset"]], small_input=pc["dataset"] != "tiny-imagenet",
                   width=pc["resnet_width"])
    net.load_state_dict(state["model"])
    return net


def build_model(cfg, data: MosaicData):
    if cfg.task == "pretrain":
        return build_classifier(cfg, data.channels)
    mosaic = build_mosaic(cfg, data.channels, data.tile_size)
    if cfg.task == "mosaic":
        return mosaic
    if not cfg.classifier:
        raise ValueError("--classifier: the classify task needs the run folder of a '--task pretrain' run")
    return ClassifyNet(mosaic, load_classifier(cfg.classifier, cfg, data.channels))


# --------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(cfg, model, data: MosaicData, device: torch.device, batch_size: int = 250) -> dict:
    """Test-set metrics on fixed random shuffles (the same for every model).

    mosaic:   mse (Hungarian reconstruction, Table 1), acc_perm (every tile at its position, Table 4),
              acc_pixel (reconstruction identical pixel for pixel: identical tiles may be swapped),
              mse_soft (before Hungarian).
    classify: acc (soft assignment, Table 2), mse_soft (Table 5), acc_max / acc_min / mse_min rows, plus the
              Hungarian acc_perm / mse for reference.
    pretrain: acc (original images = *max*), acc_min (randomly shuffled tiles).
    """
    model.eval()
    g = _gen(EVAL_SEED, cfg.tiles)
    sums: dict[str, float] = {}
    count = 0

    def add(name, values):
        sums[name] = sums.get(name, 0.0) + float(values.double().sum())

    for i in range(0, data.test_x.shape[0], batch_size):
        x = data.test_x[i: i + batch_size].to(device)
        y = data.test_y[i: i + batch_size].to(device)
        shuffled, target, perm = batch_tiles(x, cfg.tiles, g)
        shuffled, target, perm = shuffled.to(device), target.to(device), perm.to(device)
        count += x.shape[0]
        if cfg.task == "pretrain":
            add("acc", model(x).argmax(1) == y)
            add("acc_min", model(assemble(shuffled, cfg.tiles)).argmax(1) == y)
            continue
        mosaic = model.mosaic if cfg.task == "classify" else model
        P = mosaic.permutation(shuffled)
        soft = setperm.apply_permutation(shuffled, P)
        add("mse_soft", (soft - target).pow(2).flatten(1).mean(1))
        idx = setperm.hungarian(P).to(device)
        hard = gather_positions(shuffled, idx)
        add("mse", (hard - target).pow(2).flatten(1).mean(1))
        add("acc_perm", (idx == target_index(perm)).all(1))
        add("acc_pixel", (hard == target).flatten(1).all(1))
        if cfg.task == "classify":
            clf = model.classifier
            add("acc", clf(assemble(soft, cfg.tiles)).argmax(1) == y)  # soft assignments, as released
            add("acc_hard", clf(assemble(hard, cfg.tiles)).argmax(1) == y)
            add("acc_max", clf(x).argmax(1) == y)
            add("acc_min", clf(assemble(shuffled, cfg.tiles)).argmax(1) == y)
            add("mse_min", (shuffled - target).pow(2).flatten(1).mean(1))  # Table 5 *min* row
    out = {k: v / count for k, v in sums.items()}
    out["n_test"] = count
    if cfg.task != "pretrain":
        mosaic = model.mosaic if cfg.task == "classify" else model
        out["eta"] = float(mosaic.permute.eta) if mosaic.permute.eta is not None else None
    return out


def _eta(model) -> Optional[float]:
    m = model.mosaic if isinstance(model, ClassifyNet) else model
    if isinstance(m, MosaicNet) and getattr(m.permute, "eta", None) is not None:
        return float(m.permute.eta)
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
    soft = setperm.apply_permutation(shuffled, P)
    hard = gather_positions(shuffled, setperm.hungarian(P).to(device))
    for name, t in (("shuffled", shuffled), ("soft", soft), ("hungarian", hard), ("target", target)):
        writer.add_images(f"samples/{name}", data.denormalise(assemble(t, cfg.tiles).cpu()), step)


# ----------------------------------------------------------------------------------------- training
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


def train(cfg) -> dict:
    """Train as configured (an argparse Namespace, see ``__main__``); return the final test metrics."""
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    t_load = time.perf_counter()
    data = load_data(cfg)
    cfg.tiles_size = data.train_x.shape[-1]
    cfg.n_train, cfg.n_test = int(data.train_x.shape[0]), int(data.test_x.shape[0])
    load_seconds = time.perf_counter() - t_load
    model = build_model(cfg, data).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)

    run = RunDir(cfg.out)
    ckpt_dir = run.checkpoints
    epoch, batch, step, history, train_seconds = 0, 0, 0, [], 0.0
    found = latest_checkpoint(ckpt_dir) if cfg.resume else None
    if cfg.resume and found is None:
        print(f"--resume: no checkpoint in {ckpt_dir}, starting from scratch")
    if found is not None:
        state = load_checkpoint(found, model=model, optimizer=opt)
        old = state["config"]
        for key in ("dataset", "tiles", "model", "task", "subset", "batch_size", "seed"):
            if old.get(key) != getattr(cfg, key):
                raise ValueError(f"--resume: checkpoint {found} has {key}={old.get(key)!r}, this run {getattr(cfg, key)!r}")
        ex = state["extra"]
        epoch, batch, step, history, train_seconds = ex["epoch"], ex["batch"], state["step"], ex["history"], ex["train_seconds"]
        print(f"resumed from {found} at epoch {epoch}, batch {batch}")
    cfg.epochs_done_at_start = epoch
    run.write_json("config.json", {k: v for k, v in vars(cfg).items() if not callable(v)})
    writer = run.writer
    n = data.train_x.shape[0]
    per_epoch = math.ceil(n / cfg.batch_size)

    def checkpoint(ep, bt):
        save_checkpoint(ckpt_dir, config={k: v for k, v in vars(cfg).items() if not callable(v)}, step=step,
                        model=model, optimizer=opt, keep_last=2,
                        extra={"epoch": ep, "batch": bt, "history": history, "train_seconds": train_seconds})

    while epoch < cfg.epochs:
        model.train()
        order = torch.randperm(n, generator=_gen(cfg.seed, epoch))
        bar = progress(range(batch, per_epoch), total=per_epoch, initial=batch,
                       desc=f"{cfg.task} {cfg.dataset} {cfg.tiles}x{cfg.tiles} {cfg.model} ep {epoch + 1}/{cfg.epochs}")
        t0 = time.perf_counter()
        for j in bar:
            idx = order[j * cfg.batch_size: (j + 1) * cfg.batch_size]
            x, y = data.train_x[idx].to(device), data.train_y[idx].to(device)
            shuffled, target, _ = batch_tiles(x, cfg.tiles, _gen(cfg.seed, epoch, j))
            loss, extra = _loss(cfg, model, x, y, shuffled.to(device), target.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise FloatingPointError(f"non-finite loss {lv} at epoch {epoch}, batch {j}")
            if step % cfg.log_every == 0 and writer is not None:
                writer.add_scalar("train/loss", lv, step)
                for k, v in extra.items():
                    writer.add_scalar(f"train/{k}", v, step)
                if cfg.task != "pretrain":
                    setperm.monitor.log_step_sizes(writer, model, step)
            bar.set_postfix(loss=f"{lv:.4f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                train_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                checkpoint(epoch, j + 1)
        train_seconds += time.perf_counter() - t0
        bar.close()
        metrics = evaluate(cfg, model, data, device)
        metrics.update(epoch=epoch + 1, step=step, train_seconds=round(train_seconds, 1))
        history.append(metrics)
        if writer is not None:
            for k, v in metrics.items():
                if isinstance(v, float) and k not in ("train_seconds",):
                    writer.add_scalar(f"test/{k}", v, step)
            log_samples(writer, cfg, model, data, device, step)
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}), flush=True)
        epoch, batch = epoch + 1, 0
        checkpoint(epoch, 0)
    final = dict(history[-1]) if history else {}
    final["load_seconds"] = round(load_seconds, 1)
    run.write_json("metrics.json", {"final": final, "history": history, "config": vars(cfg)})
    run.close()
    return final


def run_eval(cfg) -> dict:
    """Evaluate the latest checkpoint of ``cfg.out`` (its saved config decides the model) on the test split."""
    torch.set_num_threads(cfg.threads)
    found = latest_checkpoint(Path(cfg.out) / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"--out: no checkpoint in {Path(cfg.out) / 'checkpoints'}")
    state = torch.load(found, map_location="cpu", weights_only=False)
    saved = type(cfg)(**{**state["config"], "data_root": cfg.data_root, "test_subset": cfg.test_subset,
                         "subset": 1, "device": cfg.device, "threads": cfg.threads})
    data = load_data(saved)
    model = build_model(saved, data)
    model.load_state_dict(state["model"])
    model.to(cfg.device)
    metrics = evaluate(saved, model, data, torch.device(cfg.device))
    metrics["checkpoint"] = str(found)
    RunDir(cfg.out).write_json("eval.json", metrics)
    return metrics
