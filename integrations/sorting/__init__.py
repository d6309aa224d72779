"""Number sorting (paper section 4.1, appendices C.1 and F.1) through ``setperm``.

A set of N numbers drawn from U[0, 1) is turned into a sorted sequence by a learned permutation
``P = PermutationOptimization(x)`` (PO-U: uniform initialisation, T = 6 inner steps) and trained with
the MSE between ``apply_permutation(x, P)`` and ``sort(x)``. Evaluation (float64) turns ``P`` into a
hard permutation with the Hungarian algorithm on ``-P`` (as the paper, after Mena et al. 2018) and
also by a plain argmax per position, on seven intervals.

Entry point: ``python -m integrations.sorting train|eval|table|demo``.
"""
from .data import PAPER_INTERVALS, sample_sets, step_seed
from .model import build_model, sort_forward
from .evaluate import evaluate, evaluate_interval, sort_metrics

__all__ = [
    "PAPER_INTERVALS",
    "sample_sets",
    "step_seed",
    "build_model",
    "sort_forward",
    "evaluate",
    "evaluate_interval",
    "sort_metrics",
]
