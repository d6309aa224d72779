"""The unrolled permutation optimisation (algorithm 1) as two Triton kernels, one program per set.

:func:`setperm.functional.optimize_permutation` runs ``T`` steps of eq. 7, each with a Sinkhorn
normalisation of ``2L`` half-steps: in plain PyTorch every half-step and step is several small
operations, each a kernel launch on a GPU, in forward and again in backward, and for the set sizes
of VQA or sorting (N <= 128) the launches, not the arithmetic, set the time there. Here one program
per set keeps its ``(N, N)`` matrices on chip for the whole optimisation: one launch forward, one
backward.

Same maths as the unrolled path (``kernel="chunked"`` / ``"compiled"``), written once more in
Triton's language:

- Sinkhorn in the log domain (eq. 11-12, as :func:`setperm.functional.sinkhorn` with
  ``method="log"``: logits clamped to half the dtype's range, the masked assignment of
  :func:`setperm.masking.assignment_mask`), kept as row and column potentials: after every
  half-step the iterate is ``z - a_i - b_k``, so backward recomputes any half-step's softmax from
  ``z`` and two stored vectors;
- the step ``P~ <- P~ - (2 eta C) B(P)`` with the position balance ``B`` of eq. 4 by a cumulative
  sum, and its adjoint ``-B`` in backward (``B`` is anti-self-adjoint along the positions);
- backward through every step in reverse order: ``dL/dC_step`` and ``dL/dP~(0)``.

Forward saves each step's logits ``(B, T + 1, N, N)`` and the potentials for backward. The
``(N, N)`` matrix products are loops of outer products in float32 (no TF32), their operands read
from a per-set scratch tile that stays in the L1 cache; ``tl.dot`` would stage whole float32
operands per thread (spilling to the stack at 128 x 128) or, on tensor cores, need more shared
memory than a block has (``python -m benchmarks.fused_resources``). Applies to float32
(half inputs are computed in float32) sequence costs with ``1 <= N <= MAX_SET_SIZE`` on CUDA;
elsewhere :func:`optimize_permutation` takes the unrolled path. With the environment variable
``TRITON_INTERPRET=1`` set before Triton is imported, the same kernels run on CPU tensors in
Triton's interpreter (how the test suite checks them without a GPU). First-order gradients only.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

# One set's (N, N) matrices live on chip: up to 128 x 128 float32 per matrix (64 KiB).
MAX_SET_SIZE = 128


@functools.lru_cache(maxsize=None)
def unavailable() -> Optional[str]:
    """Why the Triton kernels cannot be built here (None if they can, as far as can be told
    without compiling). Cached: where Triton is missing, every call would search the import path
    again (a failed import is not remembered), and the fallback calls this on every forward."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None


def interpreted() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``), which takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def applies(C_step: Tensor, steps: int) -> bool:
    """Whether the fused kernels compute this optimisation (else the caller runs the unrolled steps):
    a CUDA tensor (a CPU tensor under the interpreter), float32 or lower precision, at least one
    set and one element, at most :data:`MAX_SET_SIZE` elements, at least one step, and not inside a
    ``torch.compile`` trace (which compiles the unrolled steps itself)."""
    B, N = C_step.shape[0], C_step.shape[-1]
    on_device = C_step.device.type == "cuda" or (C_step.device.type == "cpu" and interpreted()
                                                  and unavailable() is None)
    return (on_device and not torch.compiler.is_compiling()
            and C_step.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and B > 0 and 0 < N <= MAX_SET_SIZE and steps > 0)


def _block(N: int) -> int:
    # a power of two (tl.arange), at least 16 (the smallest tile benchmarks.fused_resources reports)
    return max(16, 1 << (N - 1).bit_length())


def _warps(block: int) -> int:
    # the fewest warps whose kernels keep every value in registers (no stack frame) for sm_90, or at
    # 128 x 128 the least stack: python -m benchmarks.fused_resources, benchmarks/README.md
    return {16: 2, 32: 2, 64: 8}.get(block, 32)


def fused_optimize(C_step: Tensor, init_logits: Optional[Tensor], mask: Optional[Tensor], *, steps: int,
                   sinkhorn_iters: int, temperature: float, num_warps: Optional[int] = None,
                   fallback: Optional[Callable[[Tensor, Optional[Tensor]], Tensor]] = None) -> Tensor:
    """``P = S(P~(T))`` of algorithm 1 with ``P~(t+1) = P~(t) - C_step B(S(P~(t)))``.

    ``C_step`` ``(B, N, N)``: the step's matrix, ``2 eta`` times the summed cost channels (built by
    the caller, so that ``eta`` and ``C`` get their gradients through it). ``init_logits``
    ``(B, N, N)`` or None (zeros: PO-U); ``mask`` ``(B, N)`` bool or None. Returns ``P`` in the
    dtype of ``C_step``. The caller has checked :func:`applies`. ``num_warps``: warps per program
    (a power of two up to 32; default per tile size), for benchmarks that tune it.

    ``fallback(C_step, init_logits) -> P``: the same optimisation without Triton (the unrolled
    steps). Where Triton is missing, or cannot build or launch a kernel for this tile on this GPU
    (in forward or in backward), a RuntimeWarning names the reason once and ``fallback`` computes
    the values (or, in backward, the gradients by recomputing through it); later calls that would
    fail the same way go to ``fallback`` directly. Without ``fallback`` such a failure raises a
    RuntimeError naming the kernel, the tile and the cause.
    """
    if num_warps not in (None, 1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps!r}")
    reason = unavailable()
    if reason is not None:
        return _fall_back(f"kernel='fused' needs Triton for its permutation-optimisation kernels ({reason})",
                          fallback, C_step, init_logits)
    block = _block(C_step.shape[-1])
    warps = _warps(block) if num_warps is None else num_warps
    where = _where(C_step, block, warps, "forward")
    broken = _broken.get(where)
    if broken is not None:
        return _fall_back(broken, fallback, C_step, init_logits)
    # the kernels derive the masked assignment of every set from its mask row (no tensor ops here)
    mask8 = None if mask is None else mask.contiguous().view(torch.uint8)
    out_dtype = C_step.dtype
    C32 = C_step.float().contiguous()
    init32 = None if init_logits is None else init_logits.float().contiguous()
    # (inside Function.forward grad mode is off, so whether to save for backward is decided here)
    save = torch.is_grad_enabled() and (C32.requires_grad or (init32 is not None and init32.requires_grad))
    # backward's fallback recomputes from the caller's tensors (same dtype as the unrolled path)
    recompute = None if fallback is None else (fallback, C_step, init_logits)
    try:
        P = _FusedOptimize.apply(C32, init32, mask8, steps, sinkhorn_iters, float(temperature), save, warps,
                                 recompute)
    except _KernelFailure as failure:
        _broken[where] = str(failure)
        return _fall_back(str(failure), fallback, C_step, init_logits, cause=failure)
    return P.to(out_dtype)


class _FusedOptimize(torch.autograd.Function):

    @staticmethod
    def forward(ctx, C_step, init, mask8, steps, iters, temperature, save, warps, recompute):
        kernels = _kernels()
        B, N = C_step.shape[0], C_step.shape[-1]
        block = _block(N)
        P = torch.empty_like(C_step)
        hist = C_step.new_empty((B, steps + 1, N, N) if save else (1,))
        pots = C_step.new_empty((B, steps + 1, max(2 * iters, 1), 2, block) if save else (1,))
        scratch = C_step.new_empty((B, block, block))
        _launch(kernels.forward_kernel, B,
                C_step, C_step if init is None else init, P if mask8 is None else mask8, P, hist, pots, scratch,
                N, steps, iters, temperature, HAS_INIT=init is not None, HAS_MASK=mask8 is not None, SAVE=save,
                BLOCK=block, num_warps=warps)
        ctx.setup = (steps, iters, temperature, block, warps, init is not None)
        ctx.recompute = recompute
        ctx.save_for_backward(C_step, hist, pots, mask8)
        return P

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_P):
        C_step, hist, pots, mask8 = ctx.saved_tensors
        steps, iters, temperature, block, warps, has_init = ctx.setup
        B, N = C_step.shape[0], C_step.shape[-1]
        want_init = has_init and ctx.needs_input_grad[1]
        where = _where(C_step, block, warps, "backward")
        if where not in _broken:
            grad_C = torch.empty_like(C_step)
            grad_init = torch.empty_like(C_step) if want_init else grad_C
            scratch = C_step.new_empty((B, 2, block, block))
            try:
                _launch(_kernels().backward_kernel, B,
                        grad_P.float().contiguous(), C_step, grad_C if mask8 is None else mask8, hist, pots,
                        scratch, grad_C, grad_init, N, steps, iters, temperature, HAS_MASK=mask8 is not None,
                        WANT_INIT=want_init, BLOCK=block, num_warps=warps)
                return grad_C, (grad_init if want_init else None), None, None, None, None, None, None, None
            except _KernelFailure as failure:
                if ctx.recompute is None:
                    raise RuntimeError(str(failure) + _ALTERNATIVES) from failure
                _broken[where] = str(failure)
                _warn(str(failure))
        if ctx.recompute is None:
            raise RuntimeError(_broken[where] + _ALTERNATIVES)
        # Triton cannot build the backward kernel here: the gradients through the unrolled steps,
        # recomputed from the inputs (same values as the unrolled path's backward)
        fallback, C_orig, init_orig = ctx.recompute
        with torch.enable_grad():
            leaves = [C_orig.detach().requires_grad_(True)]
            if want_init:
                leaves.append(init_orig.detach().requires_grad_(True))
            P = fallback(leaves[0], leaves[1] if want_init else (None if init_orig is None else init_orig.detach()))
            grads = torch.autograd.grad(P, leaves, grad_P.to(P.dtype))
        grad_C = grads[0].to(C_step.dtype)
        grad_init = grads[1].to(C_step.dtype) if want_init else None
        return grad_C, grad_init, None, None, None, None, None, None, None


# (device, tile, warps, "forward" / "backward") -> why Triton could not build or launch that kernel
# there: later calls take the fallback at once instead of compiling again (Triton caches only what
# it built), and the reason is warned once.
_broken: Dict[Tuple, str] = {}
_warned: set = set()
_ALTERNATIVES = "; kernel='compiled' or 'chunked' compute the same values"


def _where(t: Tensor, block: int, warps: int, which: str) -> Tuple:
    return (str(t.device), block, warps, which)


def _warn(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"setperm {reason}; the unrolled steps compute the same values instead (slower)",
                      RuntimeWarning, stacklevel=5)


def _fall_back(reason: str, fallback, C_step: Tensor, init_logits: Optional[Tensor],
               cause: Optional[BaseException] = None) -> Tensor:
    if fallback is None:
        raise RuntimeError(reason + _ALTERNATIVES) from cause
    _warn(reason)
    return fallback(C_step, init_logits)


class _KernelFailure(RuntimeError):
    """Triton could not build or launch one of the kernels (the message names which and why)."""


def _launch(kernel, programs: int, *args, **meta) -> None:
    """One program per set; a kernel Triton cannot build (compiler error, too many registers or
    too much shared memory for this GPU, no C compiler for its launcher) raises a
    :class:`_KernelFailure` that names the cause."""
    device = args[0].device
    try:
        # Triton launches on the current CUDA device and its current stream: make them the tensors'
        # (a model on cuda:1 while cuda:0 is current)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            kernel[(programs,)](*args, **meta)
    except Exception as err:
        cause = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
        raise _KernelFailure(f"kernel='fused': Triton could not build or run {kernel.__name__} for sets padded to "
                             f"{meta.get('BLOCK')} ({type(err).__name__}: {cause})") from err


def _kernels():
    """The Triton kernels, imported on first use (Triton is imported only then)."""
    from . import _fused_kernels

    return _fused_kernels
