"""Train and score one (task, encoder, seed) cell: the same optimiser, steps and batches for every encoder.

Training draws fresh sets every step (sizes uniform in the training range) from a generator seeded by
the cell's seed, so every encoder of a seed sees the same batches. The model with the lowest
validation loss (checked every ``eval_every`` steps) is scored on the test sets at the training sizes
and at the larger sizes. The time per step is the median wall-clock time of forward, backward and
optimiser step (sampling excluded).
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor
from torch.nn import functional as F

from integrations.common import finite_loss
from integrations.common.seeding import seeded_generator
from setperm.functional import hungarian, permutation_entropy

from .data import ElementPool, SetBatch, element_features, fingerprint, fixed_sets, random_sizes, sample_sets
from .encoders import INVARIANT, EncoderConfig, count_parameters, max_set_size
from .model import SetModel, build_model
from .tasks import Task


@dataclass
class TrainConfig:
    """The protocol: identical for every encoder."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    min_size: int = 5
    max_size: int = 10
    test_sizes: Tuple[int, ...] = (20, 50)
    dim: int = 32                      # element embedding width D
    val_sets: int = 1000
    test_sets: int = 1000
    eval_every: int = 250
    eval_chunk: int = 250
    data_seed: int = 0
    cost_hidden: int = 32
    po_steps: int = 4
    grad_clip: Optional[float] = None
    diagnose: bool = True              # eta, entropy of P and Spearman of the Hungarian order (PO models)

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(max_train_size=self.max_size, cost_hidden=self.cost_hidden, steps=self.po_steps)


def loss_and_prediction(task: Task, out: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
    """Cross-entropy and argmax for class tasks; MSE on ``answer / scale`` and the rounded
    prediction for count tasks, the prediction itself (answer units) for real tasks."""
    if task.output == "class":
        return F.cross_entropy(out, target), out.argmax(-1)
    pred = out.squeeze(-1)
    loss = F.mse_loss(pred, target.to(pred.dtype) / task.scale)
    return loss, (pred * task.scale if task.output == "real" else torch.round(pred * task.scale).long())


@torch.no_grad()
def evaluate(model: SetModel, task: Task, sets: SetBatch, chunk: int, diagnose: bool = False) -> Dict[str, float]:
    """Accuracy and loss (count tasks also MAE and MSE in answer units) over ``sets``; real tasks
    have no accuracy (the key is absent): loss, MAE and MSE. With ``diagnose`` and a setperm encoder,
    also the mean entropy of P (nats, and divided by log n) and the mean Spearman correlation between
    each element's Hungarian position and its sort key (the digit / class for MNIST tasks, the
    x-coordinate for the position tasks, the value itself for real elements)."""
    model.eval()
    correct, loss_sum, abs_err, sq_err = 0.0, 0.0, 0.0, 0.0
    entropies, rel_entropies, rhos = [], [], []
    for start in range(0, len(sets), chunk):
        part = sets.slice(start, min(start + chunk, len(sets)))
        out, P = model(part.elements, part.mask, return_permutation=True)
        loss, pred = loss_and_prediction(task, out, part.target)
        if task.output != "real":
            correct += float((pred == part.target).sum())
        loss_sum += float(loss) * len(part)
        if task.output != "class":
            err = out.squeeze(-1) * task.scale - part.target.to(out.dtype)
            abs_err += float(err.abs().sum())
            sq_err += float((err ** 2).sum())
        if diagnose and P is not None:
            n = part.mask.sum(1)
            ent = permutation_entropy(P.float(), part.mask)
            entropies += ent.tolist()
            rel_entropies += (ent / torch.log(n.clamp_min(2).float())).tolist()
            rhos += _spearman(P, part, task)
    model.train()
    count = len(sets)
    res = {} if task.output == "real" else {"accuracy": correct / count}
    res["loss"] = loss_sum / count
    if task.output != "class":
        res.update(mae=abs_err / count, mse=sq_err / count)
    if entropies:
        res.update(entropy=float(np.mean(entropies)), entropy_rel=float(np.mean(rel_entropies)),
                   spearman=float(np.nanmean(rhos)) if not all(map(math.isnan, rhos)) else float("nan"),
                   spearman_abs=float(np.nanmean(np.abs(rhos))) if not all(map(math.isnan, rhos)) else float("nan"))
    return res


def _spearman(P: Tensor, part: SetBatch, task: Task) -> List[float]:
    """Per set: Spearman rho between each real element's Hungarian position and its sort key."""
    idx = hungarian(P.detach().float(), mask=part.mask)            # idx[b, k] = element at position k
    key = part.xs if task.elements == "points" else part.values.float()      # digit, class or real value
    out = []
    for b in range(len(part)):
        n = int(part.mask[b].sum())
        elements = idx[b, :n].numpy()
        k = key[b, elements].numpy()
        if n < 3 or np.all(k == k[0]):
            out.append(float("nan"))         # undefined for constant keys
            continue
        out.append(float(spearmanr(np.arange(n), k).correlation))
    return out


def _cell_pools(task: Task, features) -> Tuple[Optional[ElementPool], Optional[ElementPool]]:
    if task.elements != "mnist":
        return None, None
    return ElementPool(features.train, features.train_labels), ElementPool(features.test, features.test_labels)


def prior(task: Task, sets: SetBatch) -> Dict[str, float]:
    """The best constant answer *on these sets*: accuracy of their most frequent answer (an upper
    bound on any constant predictor), and for count tasks the MAE of their median. For a real task:
    the MSE of their mean and the MAE of their median (the best constants for each)."""
    if task.output == "real":
        t = sets.target.double()
        mean, median = t.mean(), t.median()
        return {"mse": float(((t - mean) ** 2).mean()), "mae": float((t - median).abs().mean()),
                "mean": float(mean), "median": float(median)}
    values, counts = sets.target.unique(return_counts=True)
    res = {"accuracy": float(counts.max()) / len(sets), "answer": int(values[counts.argmax()])}
    if task.output == "count":
        res["mae"] = float((sets.target.float() - sets.target.float().median()).abs().mean())
    return res


def run_cell(task: Task, encoder: str, seed: int, width: int, cfg: TrainConfig, features=None,
             threads: Optional[int] = None) -> dict:
    """Train ``encoder`` of ``width`` on ``task`` with ``seed``; returns the cell's result (JSON-able)."""
    if threads is not None:
        torch.set_num_threads(threads)
    train_pool, eval_pool = _cell_pools(task, features)
    in_features = element_features(task, train_pool)
    enc_cfg = cfg.encoder_config()
    model = build_model(encoder, in_features, cfg.dim, width, task.out_features, enc_cfg, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    size_range = (cfg.min_size, cfg.max_size)
    val = fixed_sets(task, "val", cfg.val_sets, size_range, cfg.data_seed, eval_pool)
    tests = {"train": fixed_sets(task, "test", cfg.test_sets, size_range, cfg.data_seed, eval_pool)}
    limit = max_set_size(encoder, enc_cfg)
    for n in cfg.test_sizes:
        if limit is None or n <= limit:
            tests[str(n)] = fixed_sets(task, "test", cfg.test_sets, n, cfg.data_seed, eval_pool)

    g = seeded_generator(seed)
    step_times: List[float] = []
    curve = []
    best = (float("inf"), None, -1)
    t_start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch = sample_sets(task, random_sizes(cfg.batch_size, size_range, g), g, train_pool)
        t0 = time.perf_counter()
        loss, _ = loss_and_prediction(task, model(batch.elements, batch.mask), batch.target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        loss_value = finite_loss(loss.detach(), step, f"cell {task.name}/{encoder}/seed{seed}")
        opt.step()
        step_times.append(time.perf_counter() - t0)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            v = evaluate(model, task, val, cfg.eval_chunk)
            curve.append({"step": step, "train_loss": loss_value, "val_loss": v["loss"],
                          f"val_{task.metric}": v[task.metric]})
            if v["loss"] < best[0]:
                best = (v["loss"], copy.deepcopy(model.state_dict()), step)
    train_seconds = time.perf_counter() - t_start
    model.load_state_dict(best[1])
    results = {k: evaluate(model, task, s, cfg.eval_chunk, diagnose=cfg.diagnose) for k, s in tests.items()}
    eta = getattr(getattr(model.encoder, "encoder", None), "eta", None)
    return {
        "task": task.name, "family": task.family, "encoder": encoder, "seed": seed, "width": width,
        "parameters": count_parameters(model), "encoder_parameters": count_parameters(model.encoder),
        "invariant": encoder in INVARIANT,
        "step_ms": 1000 * statistics.median(step_times[min(10, len(step_times) - 1):]),
        "train_seconds": train_seconds, "best_step": best[2], "curve": curve,
        "test": results, "prior": {k: prior(task, s) for k, s in tests.items()},
        "eta": None if eta is None else float(eta.detach()),
        "fingerprints": {k: fingerprint(s) for k, s in {"val": val, **tests}.items()},
        "config": asdict(cfg),
    }
