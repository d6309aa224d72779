"""Checkpoints that resume exactly: model, optimiser, scheduler, step counters and RNG states."""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, *, config: dict, step: int, model=None, optimizer=None,
                    scheduler=None, extra: Optional[dict] = None, keep_last: Optional[int] = None) -> Path:
    """Write atomically (tmp file + rename) so an interruption never leaves a broken checkpoint.

    ``path`` is a file, or a folder in which ``step_{step:08d}.pt`` is written. The resolved
    ``config`` is stored with every checkpoint. With ``keep_last`` only that many step files
    are kept in the folder.
    """
    path = Path(path)
    if path.suffix != ".pt":
        path.mkdir(parents=True, exist_ok=True)
        folder, path = path, path / f"step_{step:08d}.pt"
    else:
        folder = None
        path.parent.mkdir(parents=True, exist_ok=True)
    state = {"config": config, "step": step, "rng": rng_state()}
    if model is not None:
        m = model.module if hasattr(model, "module") else model
        state["model"] = m.state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if extra:
        state["extra"] = extra
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    if folder is not None and keep_last:
        for old in sorted(folder.glob("step_*.pt"))[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def latest_checkpoint(folder: str | os.PathLike) -> Optional[Path]:
    """The ``step_*.pt`` file with the highest step in ``folder`` (None if there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    best, best_step = None, -1
    for p in folder.glob("step_*.pt"):
        m = re.fullmatch(r"step_(\d+)\.pt", p.name)
        if m and int(m.group(1)) > best_step:
            best, best_step = p, int(m.group(1))
    return best


def load_checkpoint(path: str | os.PathLike, *, model=None, optimizer=None, scheduler=None,
                    restore_rng: bool = True, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into the given objects; return it."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no step_*.pt checkpoint in {path}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location=map_location, weights_only=False)
    if model is not None:
        m = model.module if hasattr(model, "module") else model
        m.load_state_dict(state["model"])
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    state["path"] = str(path)
    return state
