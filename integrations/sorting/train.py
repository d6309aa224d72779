"""Training loop (paper F.1): Adam, lr 0.1, batch 512, 2^18 fresh U[0,1) float32 sets, MSE to the sorted
sequence. Runs on the shared lifecycle of ``integrations.common`` (start / refuse / resume / overwrite /
interrupt, README "Runs"); progress, TensorBoard (loss and eta every step), checkpoints with the resolved
config."""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional

import torch
import torch.nn.functional as F

from integrations.common import finite_loss, load_latest, open_run, progress, resolve_device, seed_everything, step_seed
from integrations.common.cli import checkpoint_config
from setperm import PermutationMonitor

from .data import sample_sets
from .model import PERMUTATIONS, build_model, sort_forward

# The settings build_model and the evaluation read from a sorting run's stored config.
_SORTING_KEYS = ("set_size", "permutation", "steps", "cost_hidden", "eta_init", "sinkhorn_iters", "temperature",
                 "batch_size", "train_sets")

# How long to train may grow on --resume (more sets: the batches already drawn do not change).
_MAY_CHANGE = ("train_sets",)


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


@dataclass
class _Progress:
    """What a checkpoint stores besides the model and optimiser."""

    train_seconds: float = 0.0
    step_times: List[float] = field(default_factory=list)
    last_loss: Optional[float] = None


def _setup(cfg: dict, log):
    run = open_run(cfg["out"], {**cfg, "total_train_steps": total_train_steps(cfg)}, resume=cfg.get("resume", False),
                   overwrite=cfg.get("overwrite", False), may_change=_MAY_CHANGE + ("total_train_steps",), log=log)
    if run.finished:
        return run, None, None, None
    device = resolve_device(cfg["device"])
    seed_everything(cfg["seed"])
    model = build_model(cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])   # PyTorch defaults otherwise (paper F)
    extra = run.restore(model=model, optimizer=opt)
    prog = _Progress(float(extra.get("train_seconds", 0.0)), list(extra.get("step_times", [])), extra.get("last_loss"))
    if run.state is not None:
        log(f"resumed from step {run.start_step} ({run.state['path']})")
    return run, model, opt, prog


def _train_step(model, opt, cfg: dict, step: int, micro: int, device) -> float:
    """One Adam step on the batch of ``(seed, step)``; returns the batch loss. A non-finite loss stops
    the run before the update (:func:`~integrations.common.finite_loss`)."""
    x = sample_sets(cfg["batch_size"], cfg["set_size"], 0.0, 1.0, dtype=torch.float32,
                    seed=step_seed(cfg["seed"], step), device=device)        # (B, N, 1)
    opt.zero_grad(set_to_none=True)
    loss = finite_loss(accumulate_gradients(model, x, micro), step + 1)
    opt.step()
    return loss


def _log_step(writer, model, step: int, loss: float) -> Optional[float]:
    writer.add_scalar("train/loss", loss, step)
    if model.cost is None:                                # LinAssign (T = 0) has no eta
        return None
    etas = _step_sizes(model)
    for name, eta in etas.items():
        writer.add_scalar(f"eta/{name}", eta, step)
    return next(iter(etas.values()))


def _step_sizes(model) -> dict:
    """``{module path: eta}`` (the PO itself is ``"permutation"``)."""
    with PermutationMonitor(model) as monitor:
        return monitor.step_sizes()


def _summary(cfg: Mapping, model, prog: _Progress, step: int, total: int, device) -> dict:
    return dict(permutation=cfg["permutation"], set_size=cfg["set_size"], steps_done=step, total_train_steps=total,
                final_loss=prog.last_loss,
                eta=_step_sizes(model) if model.cost is not None else {},
                train_seconds=prog.train_seconds,
                median_step_seconds=statistics.median(prog.step_times) if prog.step_times else None,
                torch_threads=torch.get_num_threads(), device=str(device))


def train(config: Mapping, *, log: Callable[[str], None] = print) -> dict:
    """Train one model described by a resolved ``config`` (the CLI's flags as a dict); return its summary.

    Batch ``t`` is drawn from ``step_seed(seed, t)``, so the data does not depend on interruptions and
    ``resume`` reproduces the uninterrupted run exactly (model, Adam moments, step counter).
    ``stop_at`` ends the run after that many steps, as an interruption would; the summary then says
    ``finished: false``. A finished run with the same settings is not touched: its summary is returned.
    """
    cfg = dict(config)
    run, model, opt, prog = _setup(cfg, log)
    if run.finished:
        log(f"{run.path} holds this finished run; nothing to do")
        return run.summary
    device = next(model.parameters()).device
    total = total_train_steps(cfg)
    stop = total if cfg.get("stop_at") is None else min(total, int(cfg["stop_at"]))
    micro = micro_batch_size(cfg["batch_size"], cfg["set_size"], cfg.get("micro_batch"))
    step = run.start_step

    def checkpoint():
        return run.save(step, model=model, optimizer=opt, extra=dict(
            train_seconds=prog.train_seconds, step_times=prog.step_times, last_loss=prog.last_loss))

    model.train()
    bar = progress(total=total, initial=step, desc=f"sort {cfg['permutation']} N={cfg['set_size']}")
    try:
        with run.interruptible():
            while step < stop:
                t0 = time.perf_counter()
                prog.last_loss = _train_step(model, opt, cfg, step, micro, device)
                dt = time.perf_counter() - t0
                prog.train_seconds += dt
                prog.step_times.append(dt)
                step += 1
                eta = _log_step(run.writer, model, step, prog.last_loss)
                bar.set_postfix(loss=f"{prog.last_loss:.2e}", eta="-" if eta is None else f"{eta:.3f}")
                bar.update(1)
                if step % cfg["checkpoint_every"] == 0 or step == stop:
                    checkpoint()
                run.interrupt(step, checkpoint)
    finally:
        bar.close()
        run.close()
    summary = _summary(cfg, model, prog, step, total, device)
    if step >= total:
        run.finish(summary)
    else:
        run.write_json("summary.json", {**summary, "finished": False, "config": run.config})
    return {**summary, "finished": step >= total}


def load_trained(run_dir, *, map_location="cpu", flag: str = "--run"):
    """(model, resolved config) from a training run directory or a checkpoint file (newest intact one);
    ``flag`` names the option that gave ``run_dir`` in the error for a checkpoint of another kind."""
    model, cfg, _ = load_checkpoint(run_dir, map_location=map_location, flag=flag)
    return model, cfg


def load_checkpoint(run_dir, *, map_location="cpu", flag: str = "--run"):
    """(model, resolved config, which) like :func:`load_trained`; ``which`` says what is scored:
    ``checkpoint`` (its path), ``step``, ``total_train_steps`` and ``finished`` (step reached the total)."""
    state = load_latest(run_dir, map_location=map_location)
    cfg = checkpoint_config(state, "sorting", _SORTING_KEYS, choice=("permutation", PERMUTATIONS), run=run_dir,
                            flag=flag)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    step, total = int(state["step"]), total_train_steps(cfg)
    return model, cfg, dict(checkpoint=str(state["path"]), step=step, total_train_steps=total, finished=step >= total)
