"""Training loop (paper F.1): Adam, lr 0.1, batch 512, 2^18 fresh U[0,1) float32 sets, MSE to the sorted
sequence. Progress bar, TensorBoard (loss and eta every step), checkpoints with the resolved config,
exact resumption."""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F

from integrations.common import (RunDir, latest_checkpoint, load_checkpoint, progress, resolve_device,
                                 save_checkpoint, seed_everything)
from setperm.monitor import find_step_sizes, log_step_sizes

from .data import sample_sets, step_seed
from .model import build_model, sort_forward

# A resumed run must have been started with the same values of these (train_sets may grow).
_MUST_MATCH = ("model", "set_size", "steps", "cost_hidden", "eta_init", "sinkhorn_iters", "temperature", "lr",
               "batch_size", "seed")


def total_train_steps(config: Mapping) -> int:
    """Number of Adam steps: ``ceil(train_sets / batch_size)`` (2^18 / 512 = 512 in the paper)."""
    return math.ceil(int(config["train_sets"]) / int(config["batch_size"]))


def micro_batch_size(batch_size: int, set_size: int, requested: Optional[int] = None) -> int:
    """Sets per forward/backward pass inside one Adam step.

    ``requested`` (>= 1) is used as given; otherwise the largest divisor of ``batch_size`` whose
    ``(mb, N, N)`` float32 tensors stay within 4 MiB. This bounds the memory of the unrolled graph
    (T inner steps x L Sinkhorn iterations, each keeping several ``(mb, N, N)`` tensors for the
    backward pass) independently of the batch size; the update is the same (see
    :func:`accumulate_gradients`).
    """
    if requested:
        return min(int(requested), batch_size)
    budget = max(1, (1 << 20) // (set_size * set_size))
    return max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= budget)


def accumulate_gradients(model: torch.nn.Module, x: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """Backpropagate the sorting loss of a batch ``x`` (B, N, 1) in chunks of ``micro_batch`` sets.

    Section 4.1: MSE between the permuted set and the sorted sequence. Each chunk's mean loss is
    weighted by its share of the batch, so the accumulated ``.grad`` equals that of the full-batch
    mean (up to float summation order). Returns the detached full-batch loss.
    """
    loss = x.new_zeros(())
    for xm in x.split(micro_batch):
        y, _ = sort_forward(model, xm)
        part = F.mse_loss(y, xm.sort(dim=1).values) * (xm.shape[0] / x.shape[0])
        part.backward()
        loss += part.detach()
    return loss


def train(config: Mapping, *, log: Callable[[str], None] = print) -> dict:
    """Train one model described by a resolved ``config`` (the CLI's flags as a dict); return a summary.

    Batch ``t`` is drawn from ``step_seed(seed, t)``, so the data does not depend on interruptions and
    ``--resume`` reproduces the uninterrupted run exactly (model, Adam moments, step counter).
    ``stop_at`` (optional) ends the run after that many steps, as an interruption would.
    """
    cfg = dict(config)
    device = resolve_device(cfg["device"])
    run = RunDir(cfg["out"])                       # config.json is written once compatibility is known
    total = total_train_steps(cfg)
    seed_everything(cfg["seed"])
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])   # PyTorch defaults otherwise (paper F)

    start, train_seconds, step_times = 0, 0.0, []
    ckpt = latest_checkpoint(run.checkpoints)
    if ckpt is not None and not cfg.get("resume"):
        raise FileExistsError(f"{run.checkpoints} already holds checkpoints ({ckpt.name}); pass --resume to "
                              f"continue that run or choose another --out")
    if ckpt is not None:
        old = torch.load(ckpt, map_location="cpu", weights_only=False)["config"]
        diff = {k: (old.get(k), cfg.get(k)) for k in _MUST_MATCH if old.get(k) != cfg.get(k)}
        if diff:
            raise ValueError(f"--resume: {ckpt} was trained with different settings (old, new): {diff}")
        state = load_checkpoint(ckpt, model=model, optimizer=opt)
        start = int(state["step"])
        train_seconds = float(state.get("extra", {}).get("train_seconds", 0.0))
        step_times = list(state.get("extra", {}).get("step_times", []))
        log(f"resumed from {ckpt} at step {start}/{total}")
    elif cfg.get("resume"):
        log(f"--resume: no checkpoint in {run.checkpoints}, starting from scratch")
    run.write_json("config.json", {**cfg, "total_train_steps": total})
    writer = run.writer
    stop = total if cfg.get("stop_at") is None else min(total, int(cfg["stop_at"]))
    micro = micro_batch_size(cfg["batch_size"], cfg["set_size"], cfg.get("micro_batch"))

    def checkpoint(step: int) -> None:
        save_checkpoint(run.checkpoints, config={**cfg, "total_train_steps": total}, step=step, model=model,
                        optimizer=opt, keep_last=2,
                        extra=dict(train_seconds=train_seconds, step_times=step_times))

    model.train()
    bar = progress(total=total, initial=start, desc=f"sort {cfg['model']} N={cfg['set_size']}")
    step = start
    try:
        while step < stop:
            t0 = time.perf_counter()
            x = sample_sets(cfg["batch_size"], cfg["set_size"], 0.0, 1.0, dtype=torch.float32,
                            seed=step_seed(cfg["seed"], step), device=device)       # (B, N, 1)
            opt.zero_grad(set_to_none=True)
            loss = accumulate_gradients(model, x, micro)
            opt.step()
            dt = time.perf_counter() - t0
            train_seconds += dt
            step_times.append(dt)
            step += 1
            writer.add_scalar("train/loss", loss.item(), step)
            etas = []
            if model.cost is not None:                       # LinAssign (T = 0) never uses eta
                log_step_sizes(writer, model, step, prefix="eta")
                etas = list(find_step_sizes(model).values())
            bar.set_postfix(loss=f"{loss.item():.2e}", eta=f"{float(etas[0]):.3f}" if etas else "-")
            bar.update(1)
            if step % cfg["checkpoint_every"] == 0 or step == stop:
                checkpoint(step)
    except KeyboardInterrupt:
        checkpoint(step)                                     # keep every finished step, then stop
        log(f"interrupted: checkpoint at step {step} written; continue with --resume")
        raise
    finally:
        bar.close()
        run.close()
    summary = dict(model=cfg["model"], set_size=cfg["set_size"], steps_done=step, total_train_steps=total,
                   finished=step >= total, final_loss=float(loss.item()) if step > start else None,
                   eta={k: float(v) for k, v in find_step_sizes(model).items()} if model.cost is not None else {},
                   train_seconds=train_seconds,
                   median_step_seconds=statistics.median(step_times) if step_times else None,
                   torch_threads=torch.get_num_threads(), device=str(device))
    run.write_json("train_summary.json", summary)
    return summary


def load_trained(run_dir, *, map_location="cpu"):
    """(model, resolved config) from a training run directory or a checkpoint file."""
    path = Path(run_dir)
    state = load_checkpoint(path if path.suffix == ".pt" else path / "checkpoints", restore_rng=False,
                            map_location=map_location)
    cfg = state["config"]
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    return model, cfg
