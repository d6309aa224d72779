"""The permutation cost, its closed-form gradient and the unrolled permutation optimisation.

Paper section 2.1-2.2 (eq. 1, 4, 7), section 2.4 (lattices) and algorithm 1.
Convention: ``P[b, i, k]`` is the weight of element ``i`` at position ``k``.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from ._compat import autocast_enabled
from ._errors import check_int, check_positive, check_same_device
from .masking import pair_mask, resolve_mask
from .pairwise import check_kernel
from .sinkhorn import assignment, masked_logits, normalised

Grid = Tuple[int, int]

# The number T of inner steps, one default for the functional and the module forms: the paper
# uses 4 for its mosaics (F.2) and finds that T such as 4 is typically enough (section 2.2; 6 for
# sorting and 3 for VQA are passed explicitly).
DEFAULT_STEPS = 4


def _check_real(t: Tensor, name: str) -> None:
    """A cost or a soft permutation is real floating point: an integer one would give an integer P
    (the uniform ``1 / N`` rounded to 0) or torch's dtype errors from inside a product."""
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {t.dtype}")


def _channels(C: Tensor) -> Tensor:
    """View a cost as ``(B, K, N, N)``."""
    if not isinstance(C, Tensor):
        raise ValueError(f"C must be a tensor of shape (B, N, N) or (B, K, N, N), got {type(C).__name__}")
    _check_real(C, "C")
    if C.dim() == 3 and C.shape[-1] == C.shape[-2]:
        return C.unsqueeze(1)
    if C.dim() == 4 and C.shape[-1] == C.shape[-2]:
        return C
    raise ValueError(f"C must have shape (B, N, N) or (B, K, N, N), got {tuple(C.shape)}")


def _check_pc(P: Tensor, C: Tensor) -> Tensor:
    # P may have M != N positions (e.g. one row of a lattice); C is always element x element.
    if not isinstance(P, Tensor):
        raise ValueError(f"P must be a tensor of shape (B, N, M), got {type(P).__name__}")
    if P.dim() != 3:
        raise ValueError(f"P must have shape (B, N, M), got {tuple(P.shape)}")
    _check_real(P, "P")
    C4 = _channels(C)
    if C4.shape[0] != P.shape[0] or C4.shape[-1] != P.shape[1] or C4.shape[-2] != P.shape[1]:
        raise ValueError(f"C {tuple(C.shape)} does not match P {tuple(P.shape)}")
    check_same_device(P, "P", C4, "C")
    # the products take one dtype (autocast's casts apart), as the module's inputs do
    low = (torch.float16, torch.bfloat16, torch.float32)
    if P.dtype != C4.dtype and not (P.dtype in low and C4.dtype in low and autocast_enabled(P.device.type)):
        raise ValueError(f"P has dtype {P.dtype} but C has {C4.dtype}: give both in one dtype")
    return C4


def position_balance(P: Tensor, dim: int = -1) -> Tensor:
    """``B_jq = sum_{k'>q} P_jk' - sum_{k'<q} P_jk'`` along ``dim`` (the bracket of eq. 1 and 4).

    Computed from one cumulative sum in O(N^2): with ``S`` the inclusive cumulative sum and
    ``R`` the total, ``B = (R - S) - (S - P) = R - 2S + P``.
    """
    if P.shape[dim] == 0:
        return P.clone()
    S = torch.cumsum(P, dim=dim)
    R = S.narrow(dim, S.shape[dim] - 1, 1)
    return R - 2 * S + P


def check_grid(grid) -> Optional[Grid]:
    """``grid`` as ``(rows, cols)`` of positive ints (None: a sequence, no lattice)."""
    if grid is None:
        return None
    if not isinstance(grid, (tuple, list)) or len(grid) != 2:
        raise ValueError(f"grid must be (rows, cols) of positive ints, got {grid!r}")
    return check_int(grid[0], "grid's rows", 1), check_int(grid[1], "grid's cols", 1)


def _check_eta(eta: Union[float, Tensor]) -> Union[float, Tensor]:
    """The step size of eq. 7: a finite number >= 0, or a one-element floating-point tensor (its
    sign is the caller's: the modules pass ``|eta|``, and reading it would synchronise a GPU).
    A tensor is returned 0-d, so that it scales every set alike (a ``(N,)`` tensor would
    broadcast along the positions instead)."""
    if isinstance(eta, Tensor):
        if eta.numel() != 1 or not eta.is_floating_point():
            raise ValueError(f"eta must be a finite number >= 0 or a floating-point tensor of one element, got a "
                             f"{eta.dtype} tensor of shape {tuple(eta.shape)}")
        return eta.reshape(())
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not (0 <= eta and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0 or a floating-point tensor of one element, got {eta!r}")
    return float(eta)


def _grid_view(P: Tensor, grid: Grid) -> Tensor:
    R, Cc = grid
    B, N, M = P.shape
    if R * Cc != M:
        raise ValueError(f"grid {grid} has {R * Cc} positions but P has {M} (shape {tuple(P.shape)})")
    return P.view(B, N, R, Cc)


def _plain_cost(C4: Tensor, P: Tensor) -> Tensor:
    Bal = position_balance(P)
    pair_weight = P @ Bal.transpose(1, 2)            # sum_k P_ik B_jk
    return (C4.sum(1) * pair_weight).sum(dim=(1, 2))


def _plain_gradient(C4: Tensor, P: Tensor) -> Tensor:
    Csum = C4.squeeze(1) if C4.shape[1] == 1 else C4.sum(1)
    return 2 * (Csum @ position_balance(P))


def _lattice_balances(C4: Tensor, P: Tensor, grid: Grid) -> Tuple[Tensor, Tensor]:
    """The ``(B, N, R*Cols)`` balances of eq. 1 along each grid row (horizontal) and along each
    grid column (vertical), for a checked 2-channel cost ``C4``."""
    if C4.shape[1] != 2:
        raise ValueError(f"C: a lattice cost needs 2 channels (horizontal, vertical), got shape {tuple(C4.shape)}")
    G = _grid_view(P, grid)
    B, N = P.shape[:2]
    M = P.shape[2]                                        # (not -1: ambiguous for an empty batch)
    bal_h = position_balance(G, dim=3).reshape(B, N, M)   # balance along each grid row
    bal_v = position_balance(G, dim=2).reshape(B, N, M)   # balance along each grid column
    return bal_h, bal_v


def _lattice_total(C4: Tensor, P: Tensor, grid: Grid) -> Tensor:
    bal_h, bal_v = _lattice_balances(C4, P, grid)
    cost_h = (C4[:, 0] * (P @ bal_h.transpose(1, 2))).sum(dim=(1, 2))
    cost_v = (C4[:, 1] * (P @ bal_v.transpose(1, 2))).sum(dim=(1, 2))
    return cost_h + cost_v


def _lattice_gradient(C4: Tensor, P: Tensor, grid: Grid) -> Tensor:
    # 2 (C_h B_h + C_v B_v): every row and column of the grid at once, no loop over them
    bal_h, bal_v = _lattice_balances(C4, P, grid)
    return 2 * (C4[:, 0] @ bal_h + C4[:, 1] @ bal_v)


def permutation_cost(C: Tensor, P: Tensor, *, grid: Optional[Grid] = None) -> Tensor:
    """The total cost of the soft permutation ``P`` under the ordering cost ``C``.

    Sequence (``grid=None``), eq. 1: ``c(P) = sum_ij C_ij sum_k P_ik (sum_{k'>k} P_jk' -
    sum_{k'<k} P_jk')``, the channels of ``C`` summed. Lattice (``grid=(R, Cols)``, section 2.4):
    the sum of eq. 1 over every row and every column of the grid, ``C`` ``(B, 2, N, N)`` with
    channel 0 ordering the elements left-to-right inside each grid row and channel 1 top-to-bottom
    inside each grid column; positions are row-major, ``k = r * Cols + c``.

    Args: ``C`` (B, N, N) or (B, K, N, N); ``P`` (B, N, M) (usually M = N).
    Returns ``(B,)``.
    """
    C4 = _check_pc(P, C)
    grid = check_grid(grid)
    return _plain_cost(C4, P) if grid is None else _lattice_total(C4, P, grid)


def permutation_cost_gradient(C: Tensor, P: Tensor, *, grid: Optional[Grid] = None) -> Tensor:
    """Closed-form gradient of :func:`permutation_cost` with respect to ``P`` (exact for an
    anti-symmetric ``C``): eq. 4, ``dc/dP_pq = 2 sum_j C_pj B_jq = 2 (C B)_pq`` (one batched
    matmul), or with a ``grid`` ``2 (C_h B_h + C_v B_v)`` over rows and columns. Returns ``(B, N, M)``.
    """
    C4 = _check_pc(P, C)
    grid = check_grid(grid)
    return _plain_gradient(C4, P) if grid is None else _lattice_gradient(C4, P, grid)


def optimize_permutation(C: Tensor, init_logits: Optional[Tensor] = None, mask: Optional[Tensor] = None, *,
                         eta: Union[float, Tensor] = 1.0, steps: int = DEFAULT_STEPS, sinkhorn_iters: int = 4,
                         temperature: float = 1.0, grid: Optional[Grid] = None, return_steps: bool = False,
                         lengths: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                         kernel: str = "auto") -> Union[Tensor, List[Tensor]]:
    """Algorithm 1: ``T`` unrolled steps of ``P~ <- P~ - eta * dc/dP`` at ``P = S(P~)`` (eq. 7); the
    functional form of :class:`setperm.PermutationOptimization` (given the cost ``C``).

    The inner step uses the gradient with respect to the *normalised* P (the paper's alternative
    update, appendix D): no Sinkhorn Jacobian inside the step. The outer backward pass still
    differentiates through all steps, so ``C``, ``eta`` and ``init_logits`` get gradients.

    Args:
        C: ``(B, K, N, N)`` normalised ordering cost (K = 2 for a lattice).
        init_logits: ``(B, N, N)`` P~(0); None is PO-U (P~ = 0, i.e. uniform P).
        eta: step size: a finite number >= 0, or a floating-point tensor of one element (not
            checked for its sign; the modules pass ``|eta|``).
        steps: T >= 0 (default 4: section 2.2, the mosaics of F.2).
        mask: ``(B, N)`` bool, True = real element; or ``lengths`` ``(B,)``, or
            ``key_padding_mask`` ``(B, N)`` (True = padding); at most one of the three.
        grid: ``(R, Cols)`` for the lattice variant (positions row-major).
        return_steps: also return every intermediate ``S(P~(t))``, t = 0..T (for figures).
        kernel: ``"fused"``, and ``"auto"`` (the default) on CUDA, runs the whole optimisation,
            forward and backward, as two Triton kernels (:mod:`setperm.fused`) where they apply (a
            sequence cost on CUDA, float32 or lower precision, 1 <= N <= 128, T >= 1, not
            ``return_steps``), elsewhere the unrolled
            steps; where Triton is missing or cannot build them for this GPU, a warning (once per
            reason) names why and the unrolled steps compute the same values. Inside
            ``torch.compile`` the two kernels are operators of the compiled graph. Every other
            value of :data:`setperm.pairwise.KERNELS` runs the unrolled steps.
    Returns:
        ``P = S(P~(T))`` ``(B, N, N)``, or the list of T + 1 soft permutations.
    """
    steps = check_int(steps, "steps")
    sinkhorn_iters = check_int(sinkhorn_iters, "sinkhorn_iters")
    temperature = check_positive(temperature, "temperature")
    check_kernel(kernel)
    eta = _check_eta(eta)
    grid = check_grid(grid)
    C4 = _channels(C)
    B, _, N, _ = C4.shape
    mask = resolve_mask(C4, mask, lengths, key_padding_mask, name="C", batch_shape=(B, N))
    if init_logits is not None:
        if not isinstance(init_logits, Tensor) or tuple(init_logits.shape) != (B, N, N):
            got = tuple(init_logits.shape) if isinstance(init_logits, Tensor) else type(init_logits).__name__
            raise ValueError(f"init_logits must have shape {(B, N, N)}, got {got}")
        check_same_device(init_logits, "init_logits", C4, "C")
    if mask is not None:
        # padded elements have no influence whatever their cost or start holds: the step's C B(P)
        # sums over every element, so a NaN or inf in a padded row or column of C would reach
        # every real row (finite values there only shift real rows by constants, which Sinkhorn
        # removes), and the fused kernels read a padded element's start at its fixed position
        C4 = torch.where(pair_mask(mask).unsqueeze(1), C4, 0.0)
        if init_logits is not None:
            init_logits = torch.where(mask.unsqueeze(2), init_logits, 0.0)
    if grid is None:
        # eq. 4's factor 2 and the step size are folded into C once, so that each step of eq. 7,
        # P~ - eta * 2 C B, is one fused batched multiply-add (baddbmm) instead of four passes.
        # (squeeze, not [:, 0]: a view whose backward is one too, not a zero-filled copy of the cost)
        C_step = (2 * eta) * (C4.squeeze(1) if C4.shape[1] == 1 else C4.sum(1))
        # "auto" on CUDA: the fused kernels, measured faster than the unrolled steps there (README,
        # "Speed and memory on a GPU"); on the CPU the unrolled steps (the interpreter is a test tool)
        fused = kernel == "fused" or (kernel == "auto" and C_step.device.type == "cuda")
        if fused and not return_steps and _fused().applies(C_step, steps):
            # where Triton cannot build the kernels, the unrolled steps compute the same P instead
            return _fused().fused_optimize(C_step, init_logits, mask, steps=steps, sinkhorn_iters=sinkhorn_iters,
                                          temperature=temperature, fall_back=True)
        step_fn = _sequence_step(C_step)
    else:
        def step_fn(logits: Tensor, P: Tensor) -> Tensor:
            return logits - eta * _lattice_gradient(C4, P, grid)
    return _unroll(step_fn, _start(C4, init_logits), mask, steps, sinkhorn_iters, temperature, return_steps)


def _fused():
    """:mod:`setperm.fused`, imported on ``kernel="fused"``'s first call: it defines its operators
    then (in the ``setperm`` namespace of ``torch.library``), not at ``import setperm``."""
    from . import fused

    return fused


def _start(C: Tensor, init_logits: Optional[Tensor]) -> Tensor:
    """``P~(0)``: ``init_logits`` in the cost's dtype, or zeros (PO-U)."""
    B, N = C.shape[0], C.shape[-1]
    return C.new_zeros(B, N, N) if init_logits is None else init_logits.to(C.dtype)


def _sequence_step(C_step: Tensor):
    """Eq. 7 for a sequence cost: ``P~ - C_step B(P)`` with ``C_step = 2 eta C``."""
    def step_fn(logits: Tensor, P: Tensor) -> Tensor:
        return torch.baddbmm(logits, C_step, position_balance(P), alpha=-1)
    return step_fn


def _unroll(step_fn, logits: Tensor, mask: Optional[Tensor], steps: int, sinkhorn_iters: int, temperature: float,
            return_steps: bool) -> Union[Tensor, List[Tensor]]:
    """The unrolled loop of algorithm 1 from ``P~(0)`` = ``logits``."""
    history: List[Tensor] = []
    # sinkhorn(logits, mask=mask, ...) at every step, with what the mask makes of the logits made once
    fill = assignment(mask, logits)

    def normalise(logits: Tensor) -> Tensor:
        return normalised(masked_logits(logits, fill, temperature), logits.dtype, sinkhorn_iters)

    for _ in range(steps):
        P = normalise(logits)
        if return_steps:
            history.append(P)
        logits = step_fn(logits, P)
    P = normalise(logits)
    if return_steps:
        history.append(P)
        return history
    return P


def permutation_entropy(P: Tensor, mask: Optional[Tensor] = None, *, lengths: Optional[Tensor] = None,
                        key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Mean entropy (nats) of the rows of ``P`` ``(B, N, N)`` over real elements, ``(B,)``; 0 for a
    hard permutation, ``log n`` for the uniform assignment. Empty sets (and N = 0) give 0.
    ``mask`` / ``lengths`` / ``key_padding_mask`` as in :func:`setperm.functional.sinkhorn`."""
    if not isinstance(P, Tensor) or P.dim() != 3:
        raise ValueError(f"P must have shape (B, N, N), got {tuple(P.shape) if isinstance(P, Tensor) else type(P)}")
    if not P.is_floating_point():
        raise ValueError(f"P must be a floating-point tensor of soft permutations, got dtype {P.dtype}")
    mask = resolve_mask(P, mask, lengths, key_padding_mask, name="P")
    ent = -torch.special.xlogy(P, P).sum(-1)          # (B, N)
    if mask is None:
        return ent.sum(-1) / max(P.shape[1], 1)
    ent = torch.where(mask, ent, 0.0)
    return ent.sum(-1) / mask.sum(-1).clamp_min(1).to(ent.dtype)
