"""The functional namespace of setperm, as ``torch.nn.functional`` is of ``torch.nn``::

    import setperm.functional as SF

The maths lives in its own modules (cost, optimize, sinkhorn, assign); this module gathers the
public functions. Pairs with the modules: :func:`pairwise_cost` is the functional form of
:class:`setperm.PairwiseCost` and :func:`optimize_permutation` that of
:class:`setperm.PermutationOptimization` (applied to a cost ``C``).
"""
from .assign import apply_permutation, hungarian, permutation_matrix
from .cost import pairwise_cost
from .optimize import optimize_permutation, permutation_cost, permutation_cost_gradient, permutation_entropy
from .sinkhorn import sinkhorn

__all__ = [
    "pairwise_cost",
    "sinkhorn",
    "permutation_cost",
    "permutation_cost_gradient",
    "optimize_permutation",
    "apply_permutation",
    "hungarian",
    "permutation_matrix",
    "permutation_entropy",
]
