"""The sorting models: PO-U (the paper's model) and the LinAssign baseline, built from ``setperm``."""
from __future__ import annotations

from typing import Mapping, Tuple

from torch import Tensor, nn

from setperm import LinAssign, PermutationOptimization
from setperm.functional import apply_permutation

PERMUTATIONS = ("po-u", "linassign")


def build_model(config: Mapping) -> PermutationOptimization:
    """PO-U or LinAssign from a resolved config (keys as the command-line flags).

    PO-U (paper F.1): ``f`` = Linear(2 -> cost_hidden) -> ReLU -> Linear(cost_hidden -> 1), Xavier
    initialised with zero biases, ``steps`` = T inner gradient steps from a uniform ``P~ = 0``, a
    learnable step size eta starting at ``eta_init``.
    LinAssign (Mena et al. 2018, as reproduced in the paper): ``P~_ik = w_k x_i`` followed by
    Sinkhorn, no optimisation steps; it needs a fixed number of positions (= the training set size)
    and therefore cannot be applied to sets of another size.
    """
    kind = config["permutation"]
    common = dict(sinkhorn_iters=config["sinkhorn_iters"], temperature=config["temperature"])
    if kind == "po-u":
        return PermutationOptimization(1, cost_hidden=config["cost_hidden"], steps=config["steps"], permutation="po-u",
                                       eta_init=config["eta_init"], kernel=config.get("kernel", "auto"), **common)
    if kind == "linassign":
        return LinAssign(1, config["set_size"], **common)
    raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {kind!r}")


def sort_forward(model: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """``x`` (B, N, 1) -> (soft sorted sequence ``y`` (B, N, 1), permutation ``P`` (B, N, N)).

    ``P[b, i, k]`` is the weight of element i at position k, so ``y[b, k] = sum_i P[b, i, k] x[b, i]``.
    """
    P = model(x)
    return apply_permutation(x, P), P


def accepts_set_size(config: Mapping, set_size: int) -> bool:
    """LinAssign has one logit column per training position: only its training size is valid."""
    return config["permutation"] != "linassign" or int(config["set_size"]) == int(set_size)
