"""setperm: learning representations of sets through optimized permutations.

Zhang, Hare & Prugel-Bennett, ICLR 2019. Convention: ``P[b, i, k]`` is the weight of element
``i`` at position ``k``; the permuted sequence is ``y = P^T x``. Masks are ``(B, N)`` bool with
True = real element.
"""
from .assign import LinearAssignment, apply_permutation, hungarian, linear_assignment_logits, permutation_matrix
from .cost import PairwiseCost, normalize_cost, ordering_cost
from .encoder import LinAssign, PermutationOptimizer, PermutationSetEncoder
from .monitor import find_step_sizes, log_step_sizes, set_entropy_tracking
from .pairwise import pairwise_two_layer
from .optimize import (cost_gradient, lattice_cost, lattice_cost_gradient, optimize_permutation,
                       permutation_entropy, position_balance, total_cost)
from .sinkhorn import sinkhorn

__version__ = "0.1.0"

__all__ = [
    "PermutationSetEncoder",
    "PermutationOptimizer",
    "LinAssign",
    "PairwiseCost",
    "LinearAssignment",
    "sinkhorn",
    "ordering_cost",
    "pairwise_two_layer",
    "normalize_cost",
    "total_cost",
    "cost_gradient",
    "position_balance",
    "lattice_cost",
    "lattice_cost_gradient",
    "optimize_permutation",
    "permutation_entropy",
    "apply_permutation",
    "hungarian",
    "permutation_matrix",
    "linear_assignment_logits",
    "find_step_sizes",
    "log_step_sizes",
    "set_entropy_tracking",
]
