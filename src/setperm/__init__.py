"""setperm: learning representations of sets through optimized permutations.

Zhang, Hare & Prugel-Bennett, ICLR 2019. Convention: ``P[b, i, k]`` is the weight of element
``i`` at position ``k``; the permuted sequence is ``y = P^T x``. Masks are ``(B, N)`` bool with
True = real element (``lengths`` or ``key_padding_mask``, True = padding, are accepted instead).
Variants: ``permutation="po-u" | "po-la" | "linassign"`` (and ``"none"`` for the encoder).

Internals (``setperm.cost.normalize_cost``, ``setperm.optimize.position_balance``,
``setperm.pairwise.pairwise_two_layer``, ``setperm.assign.LinearAssignmentLogits``, ...) are
importable from their modules but are not part of the top-level API.
"""
from .assign import apply_permutation, hungarian, permutation_matrix
from .cost import PairwiseCost, ordering_cost
from .encoder import LinAssign, PermutationOptimizer, PermutationSetEncoder
from .monitor import PermutationMonitor, find_step_sizes, log_step_sizes
from .optimize import (cost_gradient, lattice_cost, lattice_cost_gradient, optimize_permutation,
                       permutation_entropy, total_cost)
from .sinkhorn import sinkhorn, sinkhorn_scaling_in_range

__version__ = "0.1.0"

__all__ = [
    "PermutationSetEncoder",
    "PermutationOptimizer",
    "LinAssign",
    "PairwiseCost",
    "sinkhorn",
    "sinkhorn_scaling_in_range",
    "apply_permutation",
    "hungarian",
    "permutation_matrix",
    "ordering_cost",
    "total_cost",
    "cost_gradient",
    "optimize_permutation",
    "permutation_entropy",
    "lattice_cost",
    "lattice_cost_gradient",
    "PermutationMonitor",
    "find_step_sizes",
    "log_step_sizes",
]
