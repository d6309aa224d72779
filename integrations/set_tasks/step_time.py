"""Time one training step (forward, backward, Adam) of every encoder's whole model, side by side.

The suite's cells record their own step times, but cells run at different moments, two at a time,
so their load differs. Here every model trains on the same batches in one process: each round
times one step of every encoder in turn (interleaved, so a busy moment hits all of them alike),
and the median over rounds is reported with its ratio to the Set Transformer's step. Elements are
random features of the task's width (a step's cost does not depend on their values); set sizes
and batch size follow the suite's protocol.
"""
from __future__ import annotations

import statistics
import time
from typing import Dict, Sequence

import torch

from integrations.common.seeding import seeded_generator

from .model import build_model
from .runner import in_features, matched_widths
from .tasks import get_task
from .train import TrainConfig, loss_and_prediction

REFERENCE = "set-transformer"


def step_times(task: str, encoders: Sequence[str], cfg: TrainConfig, reference_width: int, repeats: int,
               warmup: int = 5, seed: int = 0) -> Dict[str, dict]:
    """Per encoder: the median step time (ms) over ``repeats`` interleaved rounds, all steps, the
    parameter count, and the ratio to the Set Transformer's median (when it is among ``encoders``)."""
    t = get_task(task)
    widths = matched_widths([task], list(encoders), cfg, reference_width)[task]
    g = seeded_generator(seed)
    F = in_features(task)
    models, opts = {}, {}
    for e in encoders:
        models[e] = build_model(e, F, cfg.dim, widths[e]["width"], t.out_features, cfg.encoder_config(), seed=seed)
        opts[e] = torch.optim.Adam(models[e].parameters(), lr=cfg.lr)
    times: Dict[str, list] = {e: [] for e in encoders}
    for r in range(warmup + repeats):
        sizes = torch.randint(cfg.min_size, cfg.max_size + 1, (cfg.batch_size,), generator=g)
        N = int(sizes.max())
        mask = torch.arange(N) < sizes.unsqueeze(1)
        x = torch.randn(cfg.batch_size, N, F, generator=g) * mask.unsqueeze(-1)
        target = (torch.randint(t.num_classes, (cfg.batch_size,), generator=g) if t.output == "class"
                  else torch.randn(cfg.batch_size, generator=g) if t.output == "real"
                  else torch.randint(cfg.max_size, (cfg.batch_size,), generator=g))
        for e in encoders:
            t0 = time.perf_counter()
            loss, _ = loss_and_prediction(t, models[e](x, mask), target)
            opts[e].zero_grad(set_to_none=True)
            loss.backward()
            opts[e].step()
            if r >= warmup:
                times[e].append(1000 * (time.perf_counter() - t0))
    out = {e: {"median_ms": statistics.median(v), "ms": v, "parameters": widths[e]["parameters"]}
           for e, v in times.items()}
    if REFERENCE in out:
        for e in out:
            out[e]["vs_set_transformer"] = out[e]["median_ms"] / out[REFERENCE]["median_ms"]
    return out


def markdown(result: Dict[str, dict]) -> str:
    lines = ["| encoder | step ms (median) | vs set-transformer | parameters |", "|---|---|---|---|"]
    for e, r in result.items():
        ratio = f"{r['vs_set_transformer']:.2f}x" if "vs_set_transformer" in r else "n/a"
        lines.append(f"| {e} | {r['median_ms']:.1f} | {ratio} | {r['parameters']} |")
    return "\n".join(lines) + "\n"
