"""Run the suite: every (task, encoder, seed) cell, each written atomically to
``<out>/cells/<task>/<encoder>/seed<k>.json``; finished cells are skipped when a run is resumed.

The cells are independent, so ``jobs`` worker processes (each with ``threads`` torch threads) run
them side by side. The frozen MNIST embedding is computed once, before any cell, and cached in
``<out>/embedding/``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from integrations.common import Run, RunError, RunInterrupted, open_run, write_json
from integrations.common.datasets import dataset_folder
from integrations.common.lifecycle import CONFIG, SUMMARY
from integrations.common.pool import run_units

from .data import POINT_FEATURES, REAL_FEATURES
from .embedding import FEATURES, mnist_features
from .encoders import ENCODERS, match_width
from .model import model_size
from .tasks import get_task
from .train import TrainConfig, run_cell

Cell = Tuple[str, str, int]
REFERENCE = "po-u"           # the parameter count every encoder is matched to: PO-U at --width


def cell_path(out: Path, task: str, encoder: str, seed: int) -> Path:
    return Path(out) / "cells" / task / encoder / f"seed{seed}.json"


def is_finished(path: Path) -> bool:
    try:
        json.loads(Path(path).read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def plan_cells(tasks: Sequence[str], encoders: Sequence[str], seeds: Sequence[int]) -> List[Cell]:
    """Seed-major order, so a partly finished run already holds whole tables for its first seeds."""
    return [(t, e, s) for s in seeds for t in tasks for e in encoders]


def in_features(task: str) -> int:
    """Width of the raw elements: the frozen CNN's features for MNIST, none of the data for the others."""
    return {"mnist": FEATURES, "points": POINT_FEATURES, "reals": REAL_FEATURES}[get_task(task).elements]


def matched_widths(tasks: Sequence[str], encoders: Sequence[str], cfg: TrainConfig,
                   reference_width: int) -> Dict[str, Dict[str, dict]]:
    """Per task and encoder: the width whose whole model is closest in parameters to PO-U at
    ``reference_width``, the counts, and the relative deviation."""
    enc_cfg = cfg.encoder_config()
    table: Dict[str, Dict[str, dict]] = {}
    for t in tasks:
        f, out = in_features(t), get_task(t).out_features
        target = model_size(REFERENCE, f, cfg.dim, reference_width, out, enc_cfg)[0]
        table[t] = {}
        for e in encoders:
            width, total = match_width(e, target, lambda name, w: model_size(name, f, cfg.dim, w, out, enc_cfg)[0])
            table[t][e] = {"width": width, "parameters": total, "target": target,
                           "encoder_parameters": model_size(e, f, cfg.dim, width, out, enc_cfg)[1],
                           "deviation": (total - target) / target}
    return table


def _run_one(cell: Cell, width: int, cfg_dict: dict, out: str, embedding_cache: Optional[str],
             threads: int) -> Tuple[Cell, float]:
    """Worker: one cell, written atomically. Returns the cell and its wall time."""
    torch.set_num_threads(threads)
    task, encoder, seed = cell
    t0 = time.perf_counter()
    cfg = TrainConfig(**{**cfg_dict, "test_sizes": tuple(cfg_dict["test_sizes"])})
    features = None
    if get_task(task).elements == "mnist":
        features = mnist_features(None, cache=Path(embedding_cache))
    result = run_cell(get_task(task), encoder, seed, width, cfg, features)
    result["wall_seconds"] = time.perf_counter() - t0
    write_json(cell_path(Path(out), task, encoder, seed), result, sort_keys=False)
    return cell, result["wall_seconds"]


# Lists that only extend a sweep: adding a task, an encoder or a seed adds cells and changes none of the
# finished ones, so --resume accepts them (integrations.common.open_run's may_change). The widths follow
# from the protocol and these lists; the entries both runs share are checked in _check_widths.
EXTENDS = ("tasks", "encoders", "seeds", "widths")


def suite_config(tasks: Sequence[str], encoders: Sequence[str], seeds: Sequence[int], cfg: TrainConfig,
                 reference_width: int, jobs: int = 1, threads: int = 1, cnn_epochs: int = 2,
                 cnn_train_images: Optional[int] = None, command: str = "") -> dict:
    """The settings stored in ``config.json``: the protocol (compared on every re-run), the lists of
    :data:`EXTENDS`, and the operational keys ``workers`` (= ``--jobs``), ``threads``, ``command`` and
    ``commands`` (every command that filled the folder, in order: recorded as a union on ``--resume``)."""
    protocol = {**dataclasses.asdict(cfg), "test_sizes": list(cfg.test_sizes), "reference_width": reference_width,
                "cnn_epochs": cnn_epochs, "cnn_train_images": cnn_train_images}
    return {"protocol": protocol, "tasks": list(tasks), "encoders": list(encoders), "seeds": list(seeds),
            "widths": matched_widths(tasks, encoders, cfg, reference_width),
            "workers": jobs, "threads": threads, "command": command,
            "commands": [command] if command else []}


def _check_widths(out: Path, widths: Dict[str, Dict[str, dict]], stored: dict) -> None:
    """On --resume: every (task, encoder) that the stored run and this one share must have the same width."""
    old = stored.get("widths", {})
    differ = [f"{t}/{e} {old[t][e]['width']} -> {w['width']}" for t, row in widths.items() for e, w in row.items()
              if e in old.get(t, {}) and old[t][e].get("width") != w["width"]]
    if differ:
        raise RunError(f"--resume: {out} was started with other encoder widths ({', '.join(differ)}); "
                       "use the original settings, or start a new run with another --out or --overwrite")


def _check_names(tasks: Sequence[str], encoders: Sequence[str]) -> None:
    for t in tasks:
        get_task(t)
    bad = [e for e in encoders if e not in ENCODERS]
    if bad:
        raise ValueError(f"encoders: unknown {bad}; expected some of {ENCODERS}")


def _check_sizes(tasks: Sequence[str], cfg: TrainConfig) -> None:
    """Before the run folder is touched: every set drawn (training, validation and test) must be large enough
    for each task's answer to exist (:attr:`Task.min_size`)."""
    for flag, sizes in (("--min-size", [cfg.min_size]), ("--test-sizes", list(cfg.test_sizes))):
        for t in tasks:
            small = [n for n in sizes if n < get_task(t).min_size]
            if small:
                raise ValueError(f"{flag} {small[0]}: task {t!r} needs sets of at least {get_task(t).min_size} "
                                 f"elements")


def _recorded_before_commands(out: Path) -> List[str]:
    """The command of a folder whose config.json predates the ``commands`` list (it names its last command in
    ``command`` only), so that a ``--resume`` adds to it instead of starting the list afresh; [] otherwise
    (also for a config.json that cannot be read: :func:`open_run` reports that)."""
    try:
        stored = json.loads((out / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(stored, dict) or "commands" in stored or not stored.get("command"):
        return []
    return [stored["command"]]


def _needs_mnist(tasks: Sequence[str]) -> bool:
    return any(get_task(t).elements == "mnist" for t in tasks)


def _embedding_cache(out: Path, cnn_epochs: int, cnn_train_images: Optional[int]) -> Path:
    """Where the frozen MNIST embedding of these CNN settings is cached."""
    return out / "embedding" / f"mnist_cnn_e{cnn_epochs}_n{cnn_train_images or 'all'}.pt"


def _embedding(out: Path, data_root: Optional[os.PathLike], cnn_epochs: int,
               cnn_train_images: Optional[int]) -> Path:
    """The frozen MNIST embedding's cache file (computed now unless cached) and its record ``cnn.json``."""
    cache = _embedding_cache(out, cnn_epochs, cnn_train_images)
    feats = mnist_features(data_root, cache=cache, epochs=cnn_epochs, train_images=cnn_train_images)
    write_json(out / "embedding" / "cnn.json", {"test_accuracy": feats.cnn_test_accuracy,
                                                "pretrain_seconds": feats.pretrain_seconds,
                                                "epochs": cnn_epochs, "train_images": cnn_train_images},
               sort_keys=False)
    return cache


def run_suite(out: Path, tasks: Sequence[str], encoders: Sequence[str], seeds: Sequence[int], cfg: TrainConfig,
              reference_width: int, data_root: Optional[os.PathLike], jobs: int = 1, threads: int = 1,
              resume: bool = False, overwrite: bool = False, cnn_epochs: int = 2,
              cnn_train_images: Optional[int] = None, log=None, command: str = "") -> Tuple[Run, List[Cell]]:
    """Open ``out`` with the shared run lifecycle and run every unfinished cell; one line per cell on
    ``log`` (default stderr).

    Returns the :class:`~integrations.common.Run` and the cells run now. ``run.finished`` is True (and
    nothing ran) when ``out`` holds a finished sweep with these settings; the caller writes the report
    and calls ``run.finish``. Raises :class:`~integrations.common.RunError` for a refused folder and
    :class:`~integrations.common.RunInterrupted` after SIGINT / SIGTERM, once the running cells are
    written (a second signal stops at once)."""
    log = log if log is not None else sys.stderr
    _check_names(tasks, encoders)
    _check_sizes(tasks, cfg)
    out = Path(out)
    config = suite_config(tasks, encoders, seeds, cfg, reference_width, jobs, threads, cnn_epochs,
                          cnn_train_images, command)
    if resume and not overwrite:
        earlier = _recorded_before_commands(out)
        config["commands"] = earlier + [c for c in config["commands"] if c not in earlier]
    if _needs_mnist(tasks) and not _embedding_cache(out, cnn_epochs, cnn_train_images).is_file():
        dataset_folder("mnist", data_root)        # a missing data folder is reported before the run starts
    # the record lists every task, encoder and seed the folder holds (the report reads them all), also
    # after a --resume that asked for fewer
    run = open_run(out, config, resume=resume, overwrite=overwrite, may_change=EXTENDS,
                   accumulate=EXTENDS + ("commands",),
                   checkpoints=False,
                   log=lambda line: print(line, file=log, flush=True),
                   validate=lambda stored: _check_widths(out, config["widths"], stored))
    if run.finished:
        return run, []
    # A sweep that was finished and is now extended (--resume with longer lists) is unfinished again.
    (out / SUMMARY).unlink(missing_ok=True)
    torch.set_num_threads(threads)
    widths = config["widths"]
    done: List[Cell] = []
    with run.interruptible(finishing="the running cells, starting no new one"):
        cache = _embedding(out, data_root, cnn_epochs, cnn_train_images) if _needs_mnist(tasks) else None
        todo = [c for c in plan_cells(tasks, encoders, seeds) if not is_finished(cell_path(out, *c))]
        skipped = len(plan_cells(tasks, encoders, seeds)) - len(todo)
        print(f"set_tasks: {len(todo)} cells to run, {skipped} finished cells skipped ({out})", file=log, flush=True)
        cfg_dict = dataclasses.asdict(cfg)
        args = [(c, widths[c[0]][c[1]]["width"], cfg_dict, str(out), None if cache is None else str(cache), threads)
                for c in todo]
        t0 = time.perf_counter()

        def report(cell: Cell, sec: float) -> None:
            done.append(cell)
            print(f"[{len(done)}/{len(args)}] {'/'.join(map(str, cell))}: {sec:.1f} s "
                  f"(elapsed {time.perf_counter() - t0:.0f} s)", file=log, flush=True)

        def stop() -> None:
            signum = run.stop_signal()
            if signum is not None:
                raise RunInterrupted(signum, len(done), None, out,
                                     where=f"after {len(done)} cells (the running cells were written, no new one started)")

        stop()                                       # a signal during the CNN's pre-training
        run_units(_run_one, args, jobs, run.stop_signal, lambda i, result: report(*result))
        stop()
    return run, done
