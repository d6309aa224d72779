"""Float64 evaluation (paper F.1): exact-sort proportion and per-element accuracy, with and without
the Hungarian algorithm, on any intervals and set sizes."""
from __future__ import annotations

import copy
import time
from typing import Dict, Iterable, Iterator, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from setperm.functional import apply_permutation, hungarian

from .data import sample_sets, step_seed
from .model import accepts_set_size

# float64 elements of one (B, N, N) tensor per evaluation batch; bounds memory at large N.
_EVAL_ELEMENTS = 1 << 26
# Test sets are drawn in blocks of this many sets, block k from its own seed, and only then cut into
# evaluation batches: the sets (and so the metrics) do not depend on the batch size or its memory cap,
# and the first S sets are the same for any number of test sets. A constant of the evaluation, not a
# flag: changing it changes every test set.
SET_BLOCK = 64


def _float_key(v: float) -> int:
    """The bit pattern of a float64 as a non-negative int (an exact key for seeding)."""
    return int(np.array(v, dtype=np.float64).view(np.uint64))


def sort_metrics(x: Tensor, idx: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-set correctness of a hard ordering.

    Args:
        x: ``(B, N, 1)`` or ``(B, N)`` numbers.
        idx: ``(B, N)`` long, ``idx[b, k]`` = element placed at position k (a permutation from
            :func:`setperm.functional.hungarian`, or an argmax per position that may repeat elements).
    Returns:
        ``exact`` (B,) bool, the whole set is in sorted order; ``correct`` (B,) float, the fraction of
        positions holding the right number. Values are compared, not indices, so that tied numbers
        (possible in float32) may swap places without counting as mistakes.
    """
    if x.dim() == 3:
        if x.shape[-1] != 1:
            raise ValueError(f"x must be (B, N) or (B, N, 1), got shape {tuple(x.shape)}")
        x = x[..., 0]
    if x.dim() != 2:
        raise ValueError(f"x must be (B, N) or (B, N, 1), got shape {tuple(x.shape)}")
    if idx.shape != x.shape or idx.dtype != torch.long:
        raise ValueError(f"idx must be long of shape {tuple(x.shape)}, got {idx.dtype} {tuple(idx.shape)}")
    ok = x.gather(1, idx) == x.sort(dim=1).values
    return ok.all(dim=1), ok.to(torch.float64).mean(dim=1)


def eval_set_batches(num_sets: int, set_size: int, low: float, high: float, *, batch_size: int, seed: int = 0,
                     dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> Iterator[Tensor]:
    """The ``num_sets`` test sets of ``(seed, set_size, low, high)`` in batches of ``batch_size``, ``(n, N, 1)``.

    Block ``k`` (sets ``k * SET_BLOCK`` ...) is always drawn whole from ``step_seed(seed, N, low, high,
    "block", k)``, so concatenating the batches gives the same sets for every ``batch_size``.
    """
    keys = (seed, set_size, _float_key(low), _float_key(high), "block")
    # (the sets themselves are small, num_sets x N numbers: drawn whole, then cut)
    sets = torch.cat([sample_sets(SET_BLOCK, set_size, low, high, dtype=dtype, seed=step_seed(*keys, k))
                      for k in range(-(-num_sets // SET_BLOCK))])[:num_sets]
    for batch in sets.split(batch_size):
        yield batch.to(device)


@torch.no_grad()
def evaluate_interval(model: nn.Module, set_size: int, low: float, high: float, *, num_sets: int = 512,
                      batch_size: int = 32, seed: int = 0, dtype: torch.dtype = torch.float64,
                      device: torch.device | str = "cpu") -> Dict[str, float]:
    """Metrics of ``model`` on ``num_sets`` sets of ``set_size`` numbers from U[low, high).

    The model is run in ``dtype`` (float64 by default, paper F.1); ``model`` itself is not modified.
    Returns exact-sort proportion and per-element accuracy after the Hungarian algorithm on ``-P``
    (``exact_hungarian``, ``element_hungarian``) and after an argmax over elements per position of
    the soft ``P`` (``exact_soft``, ``element_soft``), plus the MSE of the soft sequence. The test sets
    depend on ``seed``, ``set_size`` and the interval only, not on ``batch_size`` (:func:`eval_set_batches`).
    """
    if set_size < 2:
        raise ValueError(f"set_size must be >= 2, got {set_size}")
    if not low < high:
        raise ValueError(f"interval must satisfy low < high, got [{low}, {high}]")
    if num_sets < 1:
        raise ValueError(f"num_sets must be >= 1, got {num_sets}")
    net = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    batch_size = max(1, min(batch_size, _EVAL_ELEMENTS // (set_size * set_size)))
    sums = dict(exact_hungarian=0.0, element_hungarian=0.0, exact_soft=0.0, element_soft=0.0, mse_soft=0.0)
    t0 = time.perf_counter()
    for x in eval_set_batches(num_sets, set_size, low, high, batch_size=batch_size, seed=seed, dtype=dtype,
                              device=device):
        P = net(x)                                                  # (n, N, N), rows = elements
        idx_h = hungarian(P).to(x.device)                           # (n, N) a true permutation
        idx_s = P.argmax(dim=1)                                     # (n, N) may repeat elements
        ex_h, el_h = sort_metrics(x, idx_h)
        ex_s, el_s = sort_metrics(x, idx_s)
        y = apply_permutation(x, P)                                 # soft sequence P^T x
        mse = (y - x.sort(dim=1).values).pow(2).mean(dim=(1, 2))
        for k, v in (("exact_hungarian", ex_h), ("element_hungarian", el_h), ("exact_soft", ex_s),
                     ("element_soft", el_s), ("mse_soft", mse)):
            sums[k] += float(v.to(torch.float64).sum())
    out = {k: v / num_sets for k, v in sums.items()}
    out.update(num_sets=num_sets, seconds=time.perf_counter() - t0)
    return out


def evaluate(model: nn.Module, config: Mapping, set_sizes: Sequence[int], intervals: Iterable[Tuple[float, float]],
             *, num_sets: int = 512, batch_size: int = 32, seed: int = 0, device: torch.device | str = "cpu",
             log=None) -> List[dict]:
    """Evaluate a trained model (with its resolved training ``config``) on every (size, interval).

    Sizes the model cannot handle (LinAssign at a size other than its training size) get a record
    with ``"status": "n/a"`` and the reason, so tables can say so instead of leaving a hole.
    """
    records = []
    for n in set_sizes:
        for low, high in intervals:
            rec = dict(permutation=config["permutation"], train_size=int(config["set_size"]), test_size=int(n),
                       low=float(low), high=float(high))
            if not accepts_set_size(config, n):
                rec.update(status="n/a", reason="LinAssign has a fixed number of positions (= training N)")
            else:
                rec.update(status="ok", **evaluate_interval(model, n, low, high, num_sets=num_sets,
                                                            batch_size=batch_size, seed=seed, device=device))
            if log is not None:
                log(rec)
            records.append(rec)
    return records
