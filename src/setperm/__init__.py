"""setperm: learning representations of sets through optimized permutations.

Zhang, Hare & Prugel-Bennett, ICLR 2019. Convention: ``P[b, i, k]`` is the weight of element
``i`` at position ``k``; the permuted sequence is ``y = P^T x``. Masks are ``(B, N)`` bool with
True = real element (``lengths`` or ``key_padding_mask``, True = padding, are accepted instead).

The top level holds the modules, as ``torch.nn``; the maths is in :mod:`setperm.functional`, as
``torch.nn.functional``. Internals (``setperm.cost.normalize_cost``,
``setperm.optimize.position_balance``, ``setperm.sinkhorn.sinkhorn_scaling_in_range``, ...) are
importable from their modules but are not part of the API.
"""
from . import functional
from .cost import PairwiseCost
from .encoder import LinAssign, PermutationOptimization, PermutationSetEncoder
from .monitor import PermutationMonitor

__version__ = "0.1.0"

__all__ = [
    "PermutationSetEncoder",
    "PermutationOptimization",
    "LinAssign",
    "PairwiseCost",
    "PermutationMonitor",
    "functional",
]
