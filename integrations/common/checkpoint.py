"""Checkpoint files: atomic writes, safe loading, RNG states in a form the safe loader accepts.

A checkpoint is a dict ``{"format", "run_id", "step", "config", "rng", "model", "optimizer",
"scheduler", "extra"}`` written by :func:`write_checkpoint` (under torch.distributed also ``"rng_ranks"``,
every rank's RNG states). Everything in it is a tensor or a
builtin container/scalar, so :func:`read_checkpoint` loads it with ``torch.load(...,
weights_only=True)``: a file that carries anything else (e.g. a pickled object whose
``__reduce__`` runs a command) is refused before any of it runs.
"""
from __future__ import annotations

import inspect
import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .atomic import atomic_torch_save

# the folder of a run that holds its checkpoints
CHECKPOINTS = "checkpoints"

FORMAT = 2
_STEP_FILE = re.compile(r"step_(\d+)\.pt")


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used; the message names the file and the reason."""


# ------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """Python, numpy and torch (CPU, CUDA, MPS) generator states as tensors and builtin values."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),                 # (version, tuple of ints, None): builtins only
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _mps_available():
        state["mps"] = torch.mps.get_rng_state()        # dropout on Apple's GPU draws from it
    return state


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return backend is not None and backend.is_available() and hasattr(getattr(torch, "mps", None), "get_rng_state")


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": int(np_state["pos"])},
                         "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # a run may resume on a machine with fewer GPUs (--device may change): the devices that exist
        # get their states, the others' are dropped (set_rng_state_all would fail on a missing index)
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
    if "mps" in state and _mps_available():
        torch.mps.set_rng_state(state["mps"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------- files
def step_of_file(path: Path) -> Optional[int]:
    """The step in a ``step_<n>.pt`` file name (None for other names)."""
    m = _STEP_FILE.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def step_files(folder: Path) -> list:
    """``(step, path)`` of the ``step_*.pt`` files in ``folder``, newest (largest step in the name) first."""
    if not Path(folder).is_dir():
        return []
    found = [(step_of_file(p), p) for p in Path(folder).iterdir()]
    return sorted(((s, p) for s, p in found if s is not None), key=lambda t: t[0], reverse=True)


def _unwrap(model):
    return model.module if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) \
        else model


def write_checkpoint(folder: Path, *, run_id: str, step: int, config: dict, model=None, optimizer=None,
                     scheduler=None, extra: Optional[dict] = None, rng_ranks: Optional[list] = None) -> Path:
    """Write ``folder/step_<step>.pt`` atomically (:func:`~.atomic.atomic_write`): an interruption or a
    full disk never leaves a half-written checkpoint under a checkpoint's name, nor a temporary file.
    ``rng_ranks``: under torch.distributed, every rank's :func:`rng_state` (rank order); each rank draws its
    own dropout masks, so each resumes from its own states (:func:`restore`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "run_id": run_id, "step": int(step), "config": config, "rng": rng_state()}
    if rng_ranks is not None:
        state["rng_ranks"] = list(rng_ranks)
    if model is not None:
        state["model"] = _unwrap(model).state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["extra"] = dict(extra or {})
    path = folder / f"step_{int(step):08d}.pt"
    return atomic_torch_save(path, state)


def read_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` naming the file and the reason for a missing, truncated, empty,
    foreign or unsafe file (one whose pickle names anything but tensors and builtin values).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    # (torch 2.0's load has no mmap: it reads the whole file, with the same result)
    extra = {"mmap": True} if mmap and "mmap" in inspect.signature(torch.load).parameters else {}
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, **extra)
    except Exception as e:  # noqa: BLE001 - every failure mode of a bad file ends here, named
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # torch's safe loader names a refused object "GLOBAL <name>" (2.4 and newer) or
        # "Unsupported class <name>" (older); any other refusal of the pickle is a damaged file
        refused = re.search(r"(Trying to load unsupported GLOBAL|Unsupported global|Unsupported class)[^\n]*", str(e))
        if refused:
            reason = f"it holds objects other than tensors and builtin values, refused unloaded ({refused[0].strip()})"
        elif "weights_only" in str(e) or "WeightsUnpickler" in str(e):
            damage = re.search(r"Unsupported operand[^\n.]*", str(e))
            reason = "it is not a file torch.save wrote, or it is damaged" + (f" ({damage[0].strip()})" if damage else "")
        raise CheckpointError(f"checkpoint {path} cannot be read: {type(e).__name__}: {reason}") from None
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this project (no step/config)")
    return state


def restore(state: dict, *, model=None, optimizer=None, scheduler=None, rng: bool = True, rank: int = 0) -> None:
    """Load a checkpoint's model / optimiser / scheduler / RNG states into the given objects (``rank``: the
    RNG states of that process where the checkpoint holds every rank's, else the writer's)."""
    where = state.get("path") or f"of step {state.get('step')}"
    for name, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is None or (name != "model" and name not in state):
            continue
        try:
            (_unwrap(obj) if name == "model" else obj).load_state_dict(state[name])
        except torch.cuda.OutOfMemoryError:
            raise                  # the state fits; the device's memory does not
        except (RuntimeError, ValueError, KeyError) as e:
            # a checkpoint of other code or settings (parameters added, removed or frozen since): one line, not
            # torch's listing of every key
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint {where}: its {name} state does not fit the {name} built now ({first}); "
                                  "it was written by other code or settings: start a new run, or use the code "
                                  "that wrote it") from None
    if rng and "rng" in state:
        ranks = state.get("rng_ranks") or []
        set_rng_state(ranks[rank] if rank < len(ranks) else state["rng"])


def latest_checkpoint(folder: str | os.PathLike) -> Optional[Path]:
    """The ``step_*.pt`` file with the largest step in its name (None if there is none); not read."""
    files = step_files(Path(folder))
    return files[0][1] if files else None


def run_folder(run_or_checkpoint: str | os.PathLike) -> Path:
    """The run folder of a run folder or of one of its checkpoints (``<run>/checkpoints/step_*.pt``): where
    an evaluation of either is written by default. A ``.pt`` file kept elsewhere (outside a ``checkpoints``
    folder) counts its own folder as the run's, not the folder above it."""
    path = Path(run_or_checkpoint)
    if path.suffix != ".pt":
        return path
    return path.parent.parent if path.parent.name == CHECKPOINTS else path.parent


def load_latest(run_or_checkpoint: str | os.PathLike, *, map_location: Any = "cpu") -> dict:
    """A trained model's checkpoint from a run folder (its newest intact checkpoint) or a ``.pt`` file,
    for evaluation and figures. Unreadable newer checkpoints are skipped with a warning."""
    path = Path(run_or_checkpoint)
    if path.suffix == ".pt":
        state = read_checkpoint(path, map_location=map_location)
        state["path"] = str(path)
        return state
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    files = step_files(folder)
    if not files:
        raise CheckpointError(f"no checkpoint (step_*.pt) in {folder}")
    errors = []
    for _, p in files:
        try:
            state = read_checkpoint(p, map_location=map_location)
        except CheckpointError as e:
            errors.append(str(e))
            continue
        if errors:
            import warnings

            warnings.warn(f"skipped {len(errors)} unreadable checkpoint(s): {'; '.join(errors)}", RuntimeWarning,
                          stacklevel=2)
        state["path"] = str(p)
        return state
    raise CheckpointError(f"no intact checkpoint in {folder}: {'; '.join(errors)}")
