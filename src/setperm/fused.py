"""The unrolled permutation optimisation (algorithm 1) as two Triton kernels, one program per set.

:func:`setperm.functional.optimize_permutation` runs ``T`` steps of eq. 7, each with a Sinkhorn
normalisation of ``2L`` half-steps: in plain PyTorch every half-step and step is several small
operations, each a kernel launch on a GPU, in forward and again in backward, and for the set sizes
of VQA or sorting (N <= 128) the launches, not the arithmetic, set the time there. Here one program
per set keeps its ``(N, N)`` matrices on chip for the whole optimisation: one launch forward, one
backward. Sets of different sizes padded to one ``N`` (a mask) are each computed in the smallest
tile, 16, 32, 64 or 128 wide, that holds the set's span (its elements up to the last real one:
the padding past it is pinned to its own positions, so the optimisation of the span is the whole
set's), by one launch per tile size, each program reading its set's span from the mask on the
device: where sizes vary, as VQA's 10 to 100 boxes, most sets take a tile of a quarter of the area
or less instead of every set taking ``N``'s.

Same maths as the unrolled path (``kernel="chunked"`` / ``"compiled"``), written once more in
Triton's language:

- Sinkhorn in the log domain (eq. 11-12, as :func:`setperm.functional.sinkhorn` with
  ``method="log"``: logits clamped to half the dtype's range, the masked assignment of
  :func:`setperm.masking.assignment_mask`), each half-step ``y - logsumexp(y)`` along rows or
  columns on the iterate ``y``, as the unrolled path rounds it; the half-step's correction
  ``logsumexp(y)`` (one vector) is stored, so backward rebuilds every iterate, and so every
  half-step's softmax, from ``z`` and those vectors;
- the step ``P~ <- P~ - (2 eta C) B(P)`` with the position balance ``B`` of eq. 4 by a cumulative
  sum, and its adjoint ``-B`` in backward (``B`` is anti-self-adjoint along the positions);
- backward through every step in reverse order: ``dL/dC_step`` and ``dL/dP~(0)``.

Forward saves each step's logits ``(B, T + 1, N, N)`` (``(B, T, N, N)`` for PO-U, whose first
logits are zeros) and the corrections for backward. The
``(N, N)`` matrix products are loops of outer products in float32 (no TF32), their operands read
from scratch tiles that stay in the L1 cache, each step a few entries of one operand and
a row of the other per thread (the tiles laid out as 4 adjacent columns per thread). The scratch is
a slot per program that the GPU can hold at once, which a program takes when it starts its set and
frees when done (atomics on a flag per slot), not a slot per set: for BAN's 2,048 sets, 24.75 MiB of
backward's scratch on a GPU of 132 multiprocessors instead of 384 MiB. ``tl.dot``
would stage whole float32 operands per thread (spilling to the stack at 128 x 128) or, on tensor
cores, need more shared memory than a block has (``python -m benchmarks.fused_resources``). Applies to float32
(half inputs are computed in float32) sequence costs with ``1 <= N <= MAX_SET_SIZE`` on CUDA,
with Triton 3.2 or newer; elsewhere :func:`optimize_permutation` takes the unrolled path. With
the environment variable ``TRITON_INTERPRET=1`` set before Triton is imported, the same kernels
run on CPU tensors in Triton's interpreter (how the test suite checks them without a GPU).
The kernels compute first-order gradients; a backward that is itself differentiated
(``create_graph=True``: second-order gradients, gradient penalties) runs through the unrolled steps
instead, recomputed from the inputs (in eager mode; compiled graphs do not differentiate twice), as
does backward under ``torch.func``'s transforms (``grad``, ``vjp``, ``jacrev``; ``vmap`` is not
supported).

Under ``torch.compile`` the two kernels are two operators of the compiled graph,
``setperm::fused_forward`` and ``setperm::fused_backward`` (``torch.library.custom_op``, defined
when this module is first imported): opaque to the compiler, with output shapes that depend on
``(B, N, T, L)`` only, so a graph with a dynamic set size calls them at every size without
recompiling. In eager mode an autograd function calls the same forward and backward (fewer
microseconds per call than the dispatcher).
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import types
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from ._compat import is_compiling, signature_kept
from ._errors import warn_once
from .optimize import _sequence_step, _start, _unroll

# One set's (N, N) matrices live on chip: up to 128 x 128 float32 per matrix (64 KiB).
MAX_SET_SIZE = 128
# The oldest Triton that compiles the kernels (see unavailable()).
MIN_TRITON = (3, 2)


@functools.lru_cache(maxsize=None)
def unavailable() -> Optional[str]:
    """Why the Triton kernels cannot be built here (None if they can, as far as can be told
    without compiling). Cached: where Triton is missing, every call would search the import path
    again (a failed import is not remembered), and the fallback calls this on every forward."""
    try:
        import triton
    except ImportError:
        return "Triton is not installed"
    # The kernels are written for Triton 3; torch 2.0 - 2.3 bring Triton 2.x. The compiler of
    # Triton 3.0 and 3.1 (torch 2.4, 2.5) crashes the process (a segmentation fault in its
    # thread-locality pass) on the backward kernel, for every architecture: a failure no fallback
    # could catch. 3.2 and newer compile both (``python -m benchmarks.fused_resources``).
    found = re.match(r"(\d+)\.(\d+)", triton.__version__)
    if found is None or (int(found[1]), int(found[2])) < MIN_TRITON:
        return (f"Triton {triton.__version__} is installed; the kernels need Triton "
                f"{MIN_TRITON[0]}.{MIN_TRITON[1]} or newer")
    return None


def interpreted() -> bool:
    """Whether Triton runs its interpreter (``TRITON_INTERPRET=1``), which takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def applies(C_step: Tensor, steps: int) -> bool:
    """Whether the fused kernels compute this optimisation (else the caller runs the unrolled steps):
    a CUDA tensor (a CPU tensor under the interpreter), float32 or lower precision, at least one
    set and one element, at most :data:`MAX_SET_SIZE` elements and at least one step. Inside a
    ``torch.compile`` trace the kernels are one opaque operator of the graph (``setperm::fused_forward``
    and its backward), where this torch has ``torch.library.custom_op`` (2.4 and newer)."""
    if is_compiling() and _OPERATORS is None:
        return False          # (and before reading the environment, which dynamo before 2.4 cannot trace)
    B, N = C_step.shape[0], C_step.shape[-1]
    on_device = C_step.device.type == "cuda" or (C_step.device.type == "cpu" and interpreted())
    return (on_device
            and C_step.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and B > 0 and 0 < N <= MAX_SET_SIZE and steps > 0)


def _block(N: int) -> int:
    # a power of two (tl.arange), at least 16 (the smallest tile benchmarks.fused_resources reports,
    # and tl.dot's smallest: setperm.fused_read's hidden tile too)
    return max(16, 1 << (N - 1).bit_length())


def _tiles(N: int, per_set: bool) -> Tuple[Tuple[int, int], ...]:
    """The launches for sets padded to ``N``: ``(tile, smaller)`` each, the launch computing the sets
    whose span (1 + the index of the last real element) is above ``smaller`` and at most ``tile``.
    ``per_set`` (masked sets): one launch per tile size up to ``N``'s, each set in the smallest
    tile that holds it; else one launch of ``N``'s tile."""
    top = _block(N)
    if not per_set:
        return ((top, -1),)
    sizes = [16 << i for i in range((top // 16).bit_length())]          # 16, 32, ..., top
    return tuple(zip(sizes, [-1] + sizes[:-1]))


# Scratch slots per launch under Triton's interpreter, which runs one program at a time: a few, so
# that the tests run programs that take a slot another program held before.
INTERPRETER_SLOTS = 3
# The fewest registers per thread that the kernels compile to at any tile (python -m
# benchmarks.fused_resources, at the warps setperm uses: 64 at tile 128, 72-127 at tiles 16-64):
# with the register file, a bound on how many programs a multiprocessor holds at once.
MIN_REGISTERS = 64


def _slots(device: torch.device, B: int, block: int, warps: int) -> int:
    """Scratch slots for a launch of ``B`` programs at ``block`` x ``block`` with ``warps`` warps:
    as many as programs can be resident at once, an upper bound from the GPU's multiprocessors,
    threads and registers (a program waits for a free slot if ever there are fewer), not one per
    set; at most ``B``."""
    if device.type != "cuda":
        return max(1, min(B, INTERPRETER_SLOTS))
    props = torch.cuda.get_device_properties(device)
    threads = 32 * warps
    per_sm = min(32, props.max_threads_per_multi_processor // threads,
                 getattr(props, "regs_per_multiprocessor", 65536) // (threads * MIN_REGISTERS))
    return max(1, min(B, props.multi_processor_count * max(1, per_sm)))


def _scratch(C32: Tensor, tiles: Tuple[Tuple[int, int], ...], planes: int,
             num_warps: Optional[int]) -> Tuple[Tensor, Tensor, Dict[int, int]]:
    """The launches' scratch buffer (``planes`` tiles per slot; one buffer for every launch, which run
    one after another on the stream, sized for the largest), their slots' flags (zeros: free; every
    program frees its slot, so the flags are zeros again after each launch) and each tile's slots."""
    B = C32.shape[0]
    slots = {block: _slots(C32.device, B, block, _warps(block, num_warps))
             for block, _ in tiles}
    scratch = C32.new_empty(max(n * planes * block * block for block, n in slots.items()))
    return scratch, torch.zeros(max(slots.values()), dtype=torch.int32, device=C32.device), slots


def _warps(block: int, chosen: Optional[int] = None) -> int:
    # ``chosen`` (a benchmark's num_warps) where given, else the default per tile size, for sm_90: the
    # warps at which neither kernel needs a stack frame (every value in registers) at no more than 128
    # registers per thread, and at 128 x 128 the least stack; python -m benchmarks.fused_resources,
    # benchmarks/README.md (the GPU benchmark times half and twice as many; with the scratch slots no
    # kernel at tiles 16-64 spills)
    return chosen if chosen is not None else {16: 2, 32: 4, 64: 16}.get(block, 32)


def fused_optimize(C_step: Tensor, init_logits: Optional[Tensor], mask: Optional[Tensor], *, steps: int,
                   sinkhorn_iters: int, temperature: float, num_warps: Optional[int] = None,
                   stage_c: bool = True, per_set_tiles: bool = True, fall_back: bool = False) -> Tensor:
    """``P = S(P~(T))`` of algorithm 1 with ``P~(t+1) = P~(t) - C_step B(S(P~(t)))``.

    ``C_step`` ``(B, N, N)``: the step's matrix, ``2 eta`` times the summed cost channels (built by
    the caller, so that ``eta`` and ``C`` get their gradients through it). ``init_logits``
    ``(B, N, N)`` or None (zeros: PO-U); ``mask`` ``(B, N)`` bool or None. Returns ``P`` in the
    dtype of ``C_step``. The caller has checked :func:`applies`. ``num_warps``: warps per program
    (a power of two up to 32, then every launch's; default per tile size), for benchmarks that
    tune it. ``stage_c`` (default): the kernels first copy ``C_step`` into a zero-padded scratch
    tile of their own and read the matrix products' operand from there (see
    :mod:`setperm._fused_kernels`); False reads it where it is, for benchmarks that compare the two.
    ``per_set_tiles`` (default; with a ``mask``): each set is computed in the smallest tile (16,
    32, 64 or 128 wide) that holds its span, the elements up to its last real one, by one launch
    per tile size (on the GPU no host synchronisation: each program reads its set's span from the
    mask and returns at once where it is another launch's), so that sets of 10 to 100 elements
    padded to 100 are not all computed at 128 x 128; the rest of each set's ``P``, padding past its
    span, is pinned to its own position (the identity). False computes every set whole in the tile
    of ``N``, for benchmarks that compare the two.

    ``fall_back``: where Triton is missing, or cannot build or launch a kernel for this tile on this
    GPU (in forward or in backward), a RuntimeWarning names the reason once and the unrolled steps
    compute the values (or, in backward, the gradients by recomputing through them); later calls
    that would fail the same way take the unrolled steps directly. Without it (the default, for
    benchmarks that time the kernels themselves) such a failure raises a RuntimeError naming the
    kernel, the tile and the cause.

    Under ``torch.compile`` the optimisation is one operator of the compiled graph, whatever the
    set size (no recompilation per size): the kernels run at run time as in eager mode, falling
    back the same way.
    """
    if num_warps not in (None, 1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps!r}")
    if not isinstance(stage_c, bool):
        raise ValueError(f"stage_c must be True or False, got {stage_c!r}")
    if not isinstance(per_set_tiles, bool):
        raise ValueError(f"per_set_tiles must be True or False, got {per_set_tiles!r}")
    compiling = is_compiling()
    if not compiling:
        # eager: a missing Triton or a tile known to fail takes the unrolled steps in the caller's
        # dtype at once (compiled graphs learn it at run time, inside the operator, where the set
        # size is a number: here it may be symbolic)
        tiles = _tiles(C_step.shape[-1], per_set_tiles and mask is not None)
        reason = _failure(C_step, tiles, num_warps, "forward", stage_c)
        if reason is not None:
            # in float32, as the kernels and the fallback inside them compute (the same values
            # whichever call first found the kernel missing)
            P = _fall_back(reason, fall_back, C_step.float(), None if init_logits is None else init_logits.float(),
                           mask, steps, sinkhorn_iters, temperature)
            return P.to(C_step.dtype)
    out_dtype = C_step.dtype
    C32 = C_step.float()
    init32 = None if init_logits is None else init_logits.float()
    # (inside the autograd function grad mode is off, so whether to save for backward is decided here)
    save = torch.is_grad_enabled() and (C32.requires_grad or (init32 is not None and init32.requires_grad))
    args = (steps, sinkhorn_iters, float(temperature), save, num_warps, stage_c, per_set_tiles, fall_back)
    if compiling:
        # an operator opaque to the compiler, its output shapes known from (B, N, steps, iters):
        # the compiled graph calls the kernels at run time (and falls back there, if it must)
        P = _OPERATORS.forward(C32, init32, mask, *args)[0]
    else:
        # (an autograd function: a dispatcher operator costs tens of microseconds more per call)
        P = _FusedOptimize.apply(C32, init32, mask, *args)[0]
    return P.to(out_dtype)


def _failure(t: Tensor, tiles: Tuple[Tuple[int, int], ...], num_warps: Optional[int], which: str,
             stage_c: bool) -> Optional[str]:
    """Why the kernel ``which`` cannot run at one of ``tiles`` on ``t``'s device (None: as far as is
    known, it can)."""
    reason = unavailable()
    if reason is not None:
        return f"kernel='fused' needs Triton for its permutation-optimisation kernels ({reason})"
    for block, smaller in tiles:
        known = _broken.get(_where(t, block, smaller, num_warps, which, stage_c))
        if known is not None:
            return known
    return None


# ---------------------------------------------------------------------------- forward, backward
# One implementation of each, called by the eager autograd function and by the compiled graph's
# operators alike.

def _forward(C32: Tensor, init32: Optional[Tensor], mask: Optional[Tensor], steps: int, iters: int,
             temperature: float, save: bool, num_warps: Optional[int], stage_c: bool, per_set_tiles: bool,
             fall_back: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """-> ``P`` (B, N, N), and for backward each step's logits ``(B, steps + 1, N, N)`` (the first
    left out without ``init32``: zeros) and the Sinkhorn corrections ``(B, steps + 1, 2 iters, N)``
    (empty unless ``save``). Where the kernel
    cannot be built (now or before) and ``fall_back``, ``P`` is the unrolled steps' and backward
    recomputes through them (:func:`_backward` asks :data:`_broken`)."""
    # (the kernels index contiguous (B, N, N) tensors; a compiled graph may hand over other strides)
    C32, init32, mask = (None if t is None else t.contiguous() for t in (C32, init32, mask))
    B, N = C32.shape[0], C32.shape[-1]
    P = torch.empty_like(C32)
    hist, halves = (C32.new_empty(shape) for shape in _saved_shapes(B, N, steps, iters, save, init32 is not None))
    spans = per_set_tiles and mask is not None
    tiles = _tiles(N, spans)
    reason = _failure(C32, tiles, num_warps, "forward", stage_c)
    if reason is None:
        # the kernels derive every set's span and masked assignment from its mask row (no tensor ops here)
        mask8 = None if mask is None else mask.view(torch.uint8)
        scratch, flags, slots = _scratch(C32, tiles, 1 + stage_c, num_warps)
        for block, smaller in tiles:
            try:
                # (an argument the kernel does not read is given another tensor: an empty one may have no address)
                _launch(_kernels().forward_kernel, B,
                        C32, C32 if init32 is None else init32, P if mask8 is None else mask8, P,
                        hist if hist.numel() else P, halves if halves.numel() else P, scratch, flags, slots[block],
                        N, steps, iters, temperature, HAS_INIT=init32 is not None, HAS_MASK=mask8 is not None,
                        SAVE=save, STAGE_C=stage_c, BLOCK=block, SPANS=spans, SMALLER=smaller, WIDE=MAX_SET_SIZE,
                        num_warps=_warps(block, num_warps))
            except _KernelFailure as failure:
                if not fall_back:
                    raise RuntimeError(str(failure) + _ALTERNATIVES) from failure
                reason = _broken[_where(C32, block, smaller, num_warps, "forward", stage_c)] = str(failure)
                break
        else:
            return P, hist, halves
    _fall_back(reason, fall_back, C32, init32, mask, steps, iters, temperature, warn_only=True)
    with torch.no_grad():
        P.copy_(_unrolled(C32, init32, mask, steps, iters, temperature))
    return P, hist.zero_(), halves.zero_()        # (not read: backward recomputes)


def _saved_shapes(B: int, N: int, steps: int, iters: int, save: bool,
                  has_init: bool) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The shapes of what forward saves for backward: every step's logits (but the first, zeros,
    without a start: PO-U) and the Sinkhorn correction of every half-step (empty without ``save``)."""
    if not save:
        return (0,), (0,)
    return (B, steps + has_init, N, N), (B, steps + 1, 2 * iters, N)


def _backward(grad_P: Tensor, C32: Tensor, init32: Optional[Tensor], mask: Optional[Tensor], hist: Tensor,
              halves: Tensor, steps: int, iters: int, temperature: float, num_warps: Optional[int], stage_c: bool,
              per_set_tiles: bool, fall_back: bool, want_init: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """-> ``dL/dC_step`` and ``dL/dP~(0)`` (None unless ``want_init``) from ``dL/dP``."""
    C32, mask, hist, halves = (None if t is None else t.contiguous() for t in (C32, mask, hist, halves))
    B, N = C32.shape[0], C32.shape[-1]
    spans = per_set_tiles and mask is not None
    tiles = _tiles(N, spans)
    reason = _failure(C32, tiles, num_warps, "forward", stage_c) or _failure(C32, tiles, num_warps, "backward", stage_c)
    if reason is None:
        grad_C = torch.empty_like(C32)
        grad_init = torch.empty_like(C32) if want_init else grad_C
        grad_P = grad_P.float().contiguous()
        mask8 = None if mask is None else mask.view(torch.uint8)
        scratch, flags, slots = _scratch(C32, tiles, 2 + stage_c, num_warps)
        for block, smaller in tiles:
            try:
                _launch(_kernels().backward_kernel, B,
                        grad_P, C32, grad_C if mask8 is None else mask8, hist, halves if halves.numel() else hist,
                        scratch, flags, slots[block], grad_C, grad_init, N, steps, iters, temperature,
                        HAS_MASK=mask8 is not None,
                        HAS_INIT=init32 is not None, WANT_INIT=want_init, STAGE_C=stage_c, BLOCK=block,
                        SPANS=spans, SMALLER=smaller, WIDE=MAX_SET_SIZE,
                        num_warps=_warps(block, num_warps))
            except _KernelFailure as failure:
                reason = _broken[_where(C32, block, smaller, num_warps, "backward", stage_c)] = str(failure)
                break
        else:
            return grad_C, (grad_init if want_init else None)
    _fall_back(reason, fall_back, C32, init32, mask, steps, iters, temperature, warn_only=True)
    # the kernels did not run: the gradients through the unrolled steps, recomputed from the inputs
    # (the same values as the unrolled path's backward). torch.func.vjp, not torch.autograd.grad:
    # inside a compiled graph's operator autograd is switched off below the dispatcher, and
    # enable_grad does not switch it back on
    if want_init:
        _, vjp = torch.func.vjp(lambda C, init: _unrolled(C, init, mask, steps, iters, temperature), C32, init32)
        return vjp(grad_P.to(C32.dtype))
    _, vjp = torch.func.vjp(lambda C: _unrolled(C, init32, mask, steps, iters, temperature), C32)
    return vjp(grad_P.to(C32.dtype))[0], None


def _unrolled(C_step: Tensor, init_logits: Optional[Tensor], mask: Optional[Tensor], steps: int, iters: int,
              temperature: float) -> Tensor:
    """The same optimisation as the unrolled steps of :func:`setperm.functional.optimize_permutation`."""
    return _unroll(_sequence_step(C_step), _start(C_step, init_logits), mask, steps, iters, temperature, False)


class _FusedOptimize(torch.autograd.Function):
    # forward and setup_context apart (not forward(ctx, ...)): torch.func's transforms (grad, vjp,
    # jacrev) take only functions of this form

    @staticmethod
    @signature_kept
    def forward(C32, init32, mask, steps, iters, temperature, save, num_warps, stage_c, per_set_tiles, fall_back):
        return _forward(C32, init32, mask, steps, iters, temperature, save, num_warps, stage_c, per_set_tiles,
                        fall_back)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_P, _grad_hist, _grad_halves):
        C32, init32, mask, hist, halves = ctx.saved_tensors
        want_init = ctx.has_init and ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            # a backward that is itself differentiated (create_graph=True: second-order gradients,
            # gradient penalties): the kernels compute first-order gradients only, so these come
            # from the unrolled steps, recomputed from the inputs (the same values, differentiable)
            return (*_differentiable_backward(grad_P, C32, init32, mask, *ctx.setup[:3], want_init),
                    *_NO_GRADIENTS)
        grad_C, grad_init = _backward(grad_P, C32, init32, mask, hist, halves, *ctx.setup, want_init)
        return (grad_C, grad_init, *_NO_GRADIENTS)


# (the gradients of the arguments after C32 and init32: mask and the settings)
_NO_GRADIENTS = (None,) * 9


def _setup_context(ctx, inputs, output) -> None:
    """What backward needs, for the eager autograd function and the compiled graph's operator alike:
    the inputs, each step's logits and the Sinkhorn corrections (outputs with no gradient)."""
    C32, init32, mask, steps, iters, temperature, save, num_warps, stage_c, per_set_tiles, fall_back = inputs
    _, hist, halves = output
    ctx.mark_non_differentiable(hist, halves)
    ctx.set_materialize_grads(False)          # (no zero tensors made for hist's and halves' gradients)
    ctx.setup = (steps, iters, temperature, num_warps, stage_c, per_set_tiles, fall_back)
    ctx.has_init = init32 is not None
    ctx.save_for_backward(C32, init32, mask, hist, halves)


def _differentiable_backward(grad_P: Tensor, C32: Tensor, init32: Optional[Tensor], mask: Optional[Tensor],
                             steps: int, iters: int, temperature: float,
                             want_init: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """``dL/dC_step`` and ``dL/dP~(0)`` through the unrolled steps, as a graph that autograd can
    differentiate again."""
    with torch.enable_grad():
        C = C32 if C32.requires_grad else C32.detach().requires_grad_()
        init = None if init32 is None else (init32 if init32.requires_grad else init32.detach().requires_grad_())
        P = _unrolled(C, init, mask, steps, iters, temperature)
        inputs = (C, init) if want_init else (C,)
        grads = torch.autograd.grad(P, inputs, grad_P, create_graph=True, allow_unused=True)
    return grads[0], (grads[1] if want_init else None)


def _define_operators():
    """``setperm::fused_forward`` and ``setperm::fused_backward``: the kernels as operators of a
    ``torch.compile`` graph, opaque to the compiler, their output shapes given by fake functions.
    Defined when this module is first imported (by ``kernel="fused"``'s first call, not by
    ``import setperm``), not while a graph is traced, which would break it; None where torch has
    no ``torch.library.custom_op`` (older than 2.4: compiled graphs then take the unrolled steps)."""
    if not hasattr(torch.library, "custom_op"):
        return None
    from torch.library import custom_op

    # Schemas written out: torch 2.4 cannot infer one from this module's string annotations.
    @custom_op("setperm::fused_forward", mutates_args=(), schema=(
        "(Tensor C32, Tensor? init32, Tensor? mask, SymInt steps, SymInt iters, float temperature, bool save, "
        "SymInt? num_warps, bool stage_c, bool per_set_tiles, bool fall_back) -> (Tensor, Tensor, Tensor)"))
    def forward(C32: Tensor, init32: Optional[Tensor], mask: Optional[Tensor], steps: int, iters: int,
                temperature: float, save: bool, num_warps: Optional[int], stage_c: bool, per_set_tiles: bool,
                fall_back: bool) -> Tuple[Tensor, Tensor, Tensor]:
        return _forward(C32, init32, mask, steps, iters, temperature, save, num_warps, stage_c, per_set_tiles,
                        fall_back)

    # (A fake's shapes are compiled into the graphs that call the operator, and inductor's graph
    # cache keys on the graph's code, not on the fake: a release that changes what a fake returns
    # changes the operator's schema or name too, or a cached graph from the release before would
    # assert the old shapes.)
    @forward.register_fake
    def _(C32, init32, mask, steps, iters, temperature, save, num_warps, stage_c, per_set_tiles, fall_back):
        B, N = C32.shape[0], C32.shape[-1]
        return (torch.empty_like(C32),
                *(C32.new_empty(shape) for shape in _saved_shapes(B, N, steps, iters, save, init32 is not None)))

    @custom_op("setperm::fused_backward", mutates_args=(), schema=(
        "(Tensor grad_P, Tensor C32, Tensor? init32, Tensor? mask, Tensor hist, Tensor halves, SymInt steps, "
        "SymInt iters, float temperature, SymInt? num_warps, bool stage_c, bool per_set_tiles, bool fall_back, "
        "bool want_init) -> (Tensor, Tensor)"))
    def backward(grad_P: Tensor, C32: Tensor, init32: Optional[Tensor], mask: Optional[Tensor], hist: Tensor,
                 halves: Tensor, steps: int, iters: int, temperature: float, num_warps: Optional[int],
                 stage_c: bool, per_set_tiles: bool, fall_back: bool, want_init: bool) -> Tuple[Tensor, Tensor]:
        grad_C, grad_init = _backward(grad_P, C32, init32, mask, hist, halves, steps, iters, temperature, num_warps,
                                      stage_c, per_set_tiles, fall_back, want_init)
        # (an operator returns tensors: an empty one stands for "no gradient")
        return grad_C, (grad_init if want_init else C32.new_empty(0))

    @backward.register_fake
    def _(grad_P, C32, init32, mask, hist, halves, steps, iters, temperature, num_warps, stage_c, per_set_tiles,
          fall_back, want_init):
        return torch.empty_like(C32), (torch.empty_like(C32) if want_init else C32.new_empty(0))

    def backward_rule(ctx, grad_P, _grad_hist, _grad_halves):
        C32, init32, mask, hist, halves = ctx.saved_tensors
        want_init = ctx.has_init and ctx.needs_input_grad[1]
        grad_C, grad_init = backward(grad_P, C32, init32, mask, hist, halves, *ctx.setup, want_init)
        return (grad_C, grad_init if want_init else None, *_NO_GRADIENTS)

    forward.register_autograd(backward_rule, setup_context=_setup_context)
    return types.SimpleNamespace(forward=forward, backward=backward)


_OPERATORS = _define_operators()


# (device, tile, smaller tile (see _tiles), warps, stage_c, "forward" / "backward") -> why Triton could not
# build or launch that kernel
# there: later calls take the fallback at once instead of compiling again (Triton caches only what
# it built), and the reason is warned once. A forward that failed leaves no saved tensors, so its
# backward recomputes through the unrolled steps: the key is the same for both.
_broken: Dict[Tuple, str] = {}
_warned: set = set()
_ALTERNATIVES = "; kernel='compiled' or 'chunked' compute the same values"


def _where(t: Tensor, block: int, smaller: int, num_warps: Optional[int], which: str, stage_c: bool) -> Tuple:
    return (str(t.device), block, smaller, _warps(block, num_warps), stage_c, which)


def _warn(reason: str) -> None:
    warn_once(_warned, reason, f"setperm {reason}; the unrolled steps compute the same values instead (slower)")


def _fall_back(reason: str, fall_back: bool, C_step: Tensor, init_logits: Optional[Tensor], mask: Optional[Tensor],
               steps: int, iters: int, temperature: float, warn_only: bool = False) -> Optional[Tensor]:
    """Warn once (or raise, without ``fall_back``) and compute ``P`` by the unrolled steps, with
    gradients (or, ``warn_only``, only warn)."""
    if not fall_back:
        raise RuntimeError(reason + _ALTERNATIVES)
    _warn(reason)
    return None if warn_only else _unrolled(C_step, init_logits, mask, steps, iters, temperature)


class _KernelFailure(RuntimeError):
    """Triton could not build or launch one of the kernels (the message names which and why)."""


def _launch(kernel, programs: int, *args, context: str = "kernel='fused'", tile: Optional[str] = None,
            **meta) -> None:
    """``programs`` programs of ``kernel`` (one per set here); a kernel Triton cannot build (compiler
    error, too many registers or too much shared memory for this GPU, no C compiler for its
    launcher) raises a :class:`_KernelFailure` that names ``context``, the kernel, its ``tile``
    (default: sets padded to ``BLOCK``) and the cause."""
    device = args[0].device
    try:
        # Triton launches on the current CUDA device and its current stream: make them the tensors'
        # (a model on cuda:1 while cuda:0 is current)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            # multiply-adds contracted to FMA, as every Triton release so far compiles them by default:
            # named, so that the kernels' rounding and instruction counts do not change with that
            # default (Triton 3.9 warns that 3.10 turns it off) and no such warning reaches the user
            kernel[(programs,)](*args, **meta, enable_fp_fusion=True)
    except Exception as err:
        tile = tile if tile is not None else f"sets padded to {meta.get('BLOCK')}"
        raise _KernelFailure(f"{context}: Triton could not build or run {kernel.__name__} for {tile} "
                             f"({failure_text(err)})") from err


def failure_text(err: BaseException) -> str:
    """``"Type: message"`` of the error at the root of ``err``'s chain (a Triton compilation error
    ends its own text with a caret under the failing source line; the reason is its cause's), the
    message's last line."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[-1] if text else repr(err)}"


def _kernels():
    """The Triton kernels, imported on first use (Triton is imported only then)."""
    from . import _fused_kernels

    return _fused_kernels
