"""Run directory, resolved config, device and seed handling, progress bars."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
from setperm.pairwise import KERNELS


def config_to_dict(config: Any) -> dict:
    """A JSON-serialisable dict from an argparse Namespace, a dataclass or a dict."""
    if isinstance(config, argparse.Namespace):
        d = vars(config)
    elif dataclasses.is_dataclass(config):
        d = dataclasses.asdict(config)
    elif isinstance(config, dict):
        d = dict(config)
    else:
        raise TypeError(f"config must be a Namespace, dataclass or dict, got {type(config).__name__}")
    out = {}
    for k, v in d.items():
        if callable(v):
            continue
        if isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def add_kernel_argument(parser) -> None:
    """``--kernel``: setperm's pairwise-MLP kernel, the same flag in every training script."""
    parser.add_argument("--kernel", choices=KERNELS, default="chunked",
                        help="pairwise-MLP kernel: chunked (plain PyTorch) or compiled (torch.compile-fused, faster; "
                             "compiles on first use, needs a C++ compiler on CPU / Triton on CUDA). Same results")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise validate the name.

    Raises ``ValueError`` with the name received for an unknown or unavailable device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device: unknown device {name!r} ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device: {name!r} requested but MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device: unsupported device type {dev.type!r} (use cpu, cuda[:i], mps or auto)")
    return dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
             disable: Optional[bool] = None, initial: int = 0, **kw):
    """A tqdm progress bar on stderr; disabled when stderr is not a terminal unless forced.

    ``SETPERM_PROGRESS=1`` forces it on, ``=0`` off.
    """
    from tqdm.auto import tqdm

    if disable is None:
        env = os.environ.get("SETPERM_PROGRESS")
        disable = (env == "0") if env is not None else not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, disable=disable, initial=initial,
                dynamic_ncols=True, **kw)


class RunDir:
    """An output folder: ``config.json``, ``checkpoints/``, ``tb/`` (TensorBoard), figures.

    ``RunDir(out, config)`` creates the folder and writes the resolved config. The
    TensorBoard writer is created lazily and only on rank 0 (``writer`` is None elsewhere).
    """

    def __init__(self, out: str | os.PathLike, config: Any = None, *, rank: int = 0):
        self.path = Path(out)
        self.rank = rank
        self._writer = None
        if rank == 0:
            self.path.mkdir(parents=True, exist_ok=True)
            self.checkpoints.mkdir(exist_ok=True)
            if config is not None:
                self.write_json("config.json", config_to_dict(config))

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, p)
        return p

    @property
    def writer(self):
        if self.rank != 0:
            return None
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.path / "tb"))
        return self._writer

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
