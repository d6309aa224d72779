"""Triton kernels of :mod:`setperm.fused` (imported by it on first use: this module imports Triton).

One program per set; the maths and its references to the paper are described in
:mod:`setperm.fused`.
"""
import triton
import triton.language as tl


@triton.jit
def _span(mask_ptr, b, N, WIDE: tl.constexpr):
    # the set's span: 1 + the index of its last real element (0 for an empty set). Every element
    # past it is padding, pinned to its own position (see _allowed), so the optimisation of the
    # first `span` elements and positions is the whole set's: a program computes that corner and
    # _fill_outside writes the rest. (The elements past the span would add one constant to each
    # row of the step, which the row normalisation removes.)
    every = tl.arange(0, WIDE)
    real = tl.load(mask_ptr + b * N + every, mask=every < N, other=0)
    return tl.max(tl.where(real != 0, every + 1, 0), axis=0)


@triton.jit
def _prologue(mask_ptr, b, N, out_ptr, DIAGONAL: tl.constexpr, second_ptr, SECOND: tl.constexpr, hist_ptr,
              halves_ptr, steps, iters, HAS_INIT: tl.constexpr, SAVED: tl.constexpr, SPANS: tl.constexpr,
              SMALLER: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # -> (the set's size as this program computes it, whether the set is another launch's).
    # With SPANS (masked sets, a tile per set): one launch per tile size, this one computing the
    # sets whose span is above SMALLER (the previous tile's size) and at most BLOCK; the other
    # programs return at once. The first launch (SMALLER < 0) also writes every set's entries
    # outside its span in the kernel's outputs (out_ptr: the identity with DIAGONAL, else zeros;
    # second_ptr with SECOND; what forward saves with SAVED), so that the larger tiles' kernels
    # hold no code for it (it cost them registers: python -m benchmarks.fused_resources).
    # Without SPANS every set is computed whole.
    if SPANS:
        size = _span(mask_ptr, b, N, WIDE)
        if SMALLER < 0:
            if size < N:
                _fill_outside(out_ptr + b * N * N, size, N, BLOCK, DIAGONAL)
                if SECOND:
                    _fill_outside(second_ptr + b * N * N, size, N, BLOCK, False)
                if SAVED:
                    _fill_saved_outside(hist_ptr, halves_ptr, b, size, N, steps, iters, HAS_INIT, BLOCK, WIDE)
        return size, (size <= SMALLER) | (size > BLOCK)
    else:
        return N, N < 0


@triton.jit
def _program(N, size, BLOCK: tl.constexpr):
    # the tile's indices, which of them lie inside the set's size x size corner, and their offsets
    # in a contiguous (N, N) matrix
    offs = tl.arange(0, BLOCK)
    inside = (offs[:, None] < size) & (offs[None, :] < size)
    return offs, inside, offs[:, None] * N + offs[None, :]


@triton.jit
def _fill_outside(ptr, size, N, BLOCK: tl.constexpr, DIAGONAL: tl.constexpr):
    # the entries of an (N, N) matrix outside the set's size x size corner: the identity (P: each
    # padded element past the span sits at its own position) or zeros (the gradients there, and
    # what forward saves, so that no output depends on what the memory held)
    offs = tl.arange(0, BLOCK)
    for r in range(0, N, BLOCK):
        rows = r + offs
        for c in range(0, N, BLOCK):
            cols = c + offs
            outside = ((rows[:, None] < N) & (cols[None, :] < N)
                       & ((rows[:, None] >= size) | (cols[None, :] >= size)))
            if DIAGONAL:
                value = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
            else:
                value = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
            tl.store(ptr + rows[:, None] * N + cols[None, :], value, mask=outside)


@triton.jit
def _fill_saved_outside(hist_ptr, halves_ptr, b, size, N, steps, iters, HAS_INIT: tl.constexpr,
                        BLOCK: tl.constexpr, WIDE: tl.constexpr):
    # zeros where forward saves nothing for a set of this span: its saved logits outside the corner
    # and the lanes past the span of its Sinkhorn corrections
    for t in range(1 - HAS_INIT, steps + 1):
        _fill_outside(_saved_logits(hist_ptr, b, t, steps, N, HAS_INIT), size, N, BLOCK, False)
    every = tl.arange(0, WIDE)
    past = (every >= size) & (every < N)
    for t in range(steps + 1):
        for h in range(2 * iters):
            tl.store(_half_offsets(halves_ptr, b, t, h, steps, iters, every, N), tl.zeros([WIDE], dtype=tl.float32),
                     mask=past)


@triton.jit
def _allowed(inside, offs, N, size, mask_ptr, b, HAS_MASK: tl.constexpr):
    # assignment_mask of setperm.masking for one set, inside the (BLOCK, BLOCK) tile: the n real
    # elements may take the first n positions, the j-th padded element is pinned to position n + j
    # (the same positions whether counted over the span or the whole row: past the span all are padding)
    if HAS_MASK:
        real = tl.load(mask_ptr + b * N + offs, mask=offs < size, other=0).to(tl.int32)   # (B, N) uint8
        pad = tl.where(offs < size, 1 - real, 0)
        n = tl.sum(real, axis=0)
        target = n + tl.cumsum(pad, axis=0) - 1
        ok = tl.where(real[:, None] != 0, offs[None, :] < n, offs[None, :] == target[:, None])
        inside = inside & ok
    return inside


@triton.jit
def _clamped(logits, allowed, temperature, iters):
    # sinkhorn's _prepare and _clamp_half: excluded entries -inf, the rest clamped to half
    # of float32's range
    # (NaN propagates, as in torch.clamp: a NaN cost or start gives NaN, not a finite P)
    z = tl.where(allowed, logits / temperature, float("-inf"))
    zc = tl.where(z == float("-inf"), z,
                  tl.minimum(tl.maximum(z, -1.7014117331926443e38, propagate_nan=tl.PropagateNan.ALL),
                             1.7014117331926443e38, propagate_nan=tl.PropagateNan.ALL))
    return z, tl.where(iters > 0, zc, z)


@triton.jit
def _lse(y, real, AXIS: tl.constexpr):
    # logsumexp along AXIS as torch computes it (-inf for a line of -inf, NaN with a NaN); the
    # lines of the tile past the set (``real`` False) give 0, so that they stay -inf, not NaN
    m = tl.max(y, axis=AXIS)
    m = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.exp(y - tl.expand_dims(m, AXIS)), axis=AXIS)
    return tl.where(real, m + tl.log(tl.where(real, s, 1.0)), 0.0)


@triton.jit
def _balance(P):
    # position_balance of eq. 4 along the positions: R - 2 S + P
    return tl.sum(P, axis=1)[:, None] - 2 * tl.cumsum(P, axis=1) + P


@triton.jit
def _half_offsets(halves_ptr, b, t, h, steps, iters, offs, N):
    # the (B, steps + 1, 2 iters, N) corrections, one vector per half-step: sized by N, not by the
    # tile, so that their shape is known without the tile (torch.compile's shape inference with a
    # symbolic N); the tile's lanes past the set are 0 (see _lse), which the masked loads give back
    return halves_ptr + ((b * (steps + 1) + t) * 2 * iters + h) * N + offs


@triton.jit
def _first_iterate(zc, iters):
    # the iterate before the first half-step: zc less each row's largest entry (exact near the
    # maximum, the entries that matter). The first row normalisation removes any constant of a
    # row, so no value changes, only the rounding: logsumexp of a row of large logits is rounded
    # to their spacing, which would shift every entry of the row by that error (the unrolled
    # path's scaling form starts from the row maxima as well)
    m = tl.max(zc, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    return tl.where(iters > 0, zc - m[:, None], zc)


@triton.jit
def _sinkhorn(zc, halves_ptr, b, t, steps, iters, offs, N, size, SAVE: tl.constexpr):
    # eq. 11-12 in the log domain as the unrolled path computes them: the iterate y, each
    # half-step y - logsumexp(y) along rows, then along columns, L times. The corrections
    # logsumexp(y) are saved: backward rebuilds every iterate from them (_iterates). (Kept as
    # the iterate, not as row and column potentials of zc: a potential is as large as the logits,
    # and adding the later corrections to it rounds them away once the logits are large.)
    y = _first_iterate(zc, iters)
    real = offs < size
    for r in range(iters):
        d = _lse(y, real, 1)
        y = y - d[:, None]
        if SAVE:
            tl.store(_half_offsets(halves_ptr, b, t, 2 * r, steps, iters, offs, N), d, mask=real)
        d = _lse(y, real, 0)
        y = y - d[None, :]
        if SAVE:
            tl.store(_half_offsets(halves_ptr, b, t, 2 * r + 1, steps, iters, offs, N), d, mask=real)
    return y


@triton.jit
def _correction(halves_ptr, b, t, h, steps, iters, offs, N, size):
    return tl.load(_half_offsets(halves_ptr, b, t, h, steps, iters, offs, N), mask=offs < size, other=0.0)


@triton.jit
def _iterates(zc, halves_ptr, b, t, steps, iters, offs, N, size):
    # the last iterate y, log of P = S(P~(t)), rebuilt from zc and the saved corrections by the
    # same subtractions as in forward (the same values)
    y = _first_iterate(zc, iters)
    for r in range(iters):
        y = y - _correction(halves_ptr, b, t, 2 * r, steps, iters, offs, N, size)[:, None]
        y = y - _correction(halves_ptr, b, t, 2 * r + 1, steps, iters, offs, N, size)[None, :]
    return y


@triton.jit
def _sinkhorn_backward(grad_P, logits, allowed, temperature, halves_ptr, b, t, steps, iters, offs, N, size):
    # as setperm.sinkhorn's log-domain backward: through exp, then every half-step
    # y' = y - logsumexp(y) in reverse (dy = dy' - exp(y') * sum(dy'): exp(y') is that half-step's
    # softmax), the clamp and the masking. Going back, each earlier iterate is y' plus its
    # correction (exact where exp(y) matters: after the first half-step no correction is large
    # and positive). z, zc and the iterate are recomputed from the logits, not passed in from the
    # caller, which has them, and zc again at the end, not kept through the loop: more live tiles
    # cost more stack than the elementwise recomputation does time (benchmarks/README.md, "The fused
    # kernels' resources")
    _, zc = _clamped(logits, allowed, temperature, iters)
    y = _iterates(zc, halves_ptr, b, t, steps, iters, offs, N, size)
    g = grad_P * tl.exp(y)
    for rr in range(iters):
        r = iters - 1 - rr
        g = g - tl.exp(y) * tl.sum(g, axis=0)[None, :]
        y = y + _correction(halves_ptr, b, t, 2 * r + 1, steps, iters, offs, N, size)[None, :]
        g = g - tl.exp(y) * tl.sum(g, axis=1)[:, None]
        y = y + _correction(halves_ptr, b, t, 2 * r, steps, iters, offs, N, size)[:, None]
    z, zc = _clamped(logits, allowed, temperature, iters)
    g = tl.where(zc == z, g, 0.0)
    return tl.where(allowed, g / temperature, 0.0)


@triton.jit
def _outer_products(a_ptr, a_step, a_stride, b_ptr, b_step, b_stride, size, offs, BLOCK: tl.constexpr,
                    A_WHOLE: tl.constexpr):
    # sum_k a_k b_k^T over k < size, the vectors read from (L1-cached) memory: a matrix product
    # without tl.dot, whose float32 form stages both operands in registers (most of them spilled
    # to the stack at 128 x 128) or, on tensor cores, in more shared memory than a block has.
    # b is always read from a whole scratch tile, a too with A_WHOLE; such an operand is loaded
    # without a mask: its entries past the set only reach entries of the product past the set,
    # which no caller keeps (unmasked, backward's first product at 128 x 128 went from 121 to 65
    # instructions per step on sm_90: python -m benchmarks.fused_resources).
    # The sum starts from zeros given by a load that reads nothing (its mask is false at run time,
    # which the compiler cannot know): a contiguous, aligned load of a scratch tile, which Triton
    # lays out as 4 adjacent columns per thread and a row per warp, where tl.zeros's default layout
    # would give each thread one column of 16 rows at 128 x 128 (32 warps). The loop's tiles, and
    # the kernel's with them, take this layout: each step then reads the thread's 4 entries of a
    # (the same for every thread of a warp) and one 16-byte vector of b, not 16 entries of a and
    # one of b, so that b must be a row of its tile (contiguous: backward stages the balance
    # transposed for it). At 128 x 128, 32 warps, forward's loop went from 17 loads and 87
    # instructions per step to 5 and 24.5, backward's from 17 and 46, 48 to 5 and 28.5, 30.5 (before
    # the steps were taken 4 at a time, below), and a Sinkhorn round from 230 to 80 shuffles
    # (python -m benchmarks.fused_resources; benchmarks/README.md)
    acc = tl.load(b_ptr + offs[:, None] * BLOCK + offs[None, :], mask=tl.zeros([BLOCK, BLOCK], tl.int32) + size < 0,
                  other=0.0)
    if A_WHOLE:
        # both operands whole scratch tiles: steps past the set, up to the next multiple of 4 (at
        # most the tile), add exact zeros (there a's entries are zero, the staged C's padding or the
        # logits' gradient outside the masked assignment, and b's are finite), so the loop runs 4
        # steps at a time with no remainder loop (at 128 x 128 backward's loops went from 28.5 and
        # 30.5 to 24.2 and 24.8 instructions per step, at tiles 16-64 by up to 4.8)
        for k0 in range(0, size, 4):
            for j in tl.static_range(4):
                a = tl.load(a_ptr + (k0 + j) * a_step + offs * a_stride)
                c = tl.load(b_ptr + (k0 + j) * b_step + offs * b_stride)
                acc += a[:, None] * c[None, :]
    else:
        for k in range(size):
            a = tl.load(a_ptr + k * a_step + offs * a_stride, mask=offs < size, other=0.0)
            c = tl.load(b_ptr + k * b_step + offs * b_stride)
            acc += a[:, None] * c[None, :]
    return acc


@triton.jit
def _to_scratch(ptr, x, offs, BLOCK: tl.constexpr):
    # every thread of the program reads what the others wrote, after the barriers (a scratch tile
    # is only overwritten once every read of its previous content is done)
    tl.debug_barrier()
    tl.store(ptr + offs[:, None] * BLOCK + offs[None, :], x)
    tl.debug_barrier()


@triton.jit
def _acquire(slots_ptr, b, slots):
    # a free slot of the scratch buffer, held until _release: the buffer has `slots` slots (about as
    # many as programs can be resident on the GPU at once, not one per set), each flagged 0 (free) or
    # 1 in slots_ptr. A program takes the first free one from b % slots on (one compare-and-swap
    # when the programs resident beside it hold fewer than all; otherwise it waits for one of them,
    # which are running, to finish). The atomics order this program's scratch accesses after the
    # previous holder's (acquire / release semantics)
    slot = (b % slots).to(tl.int32)
    while tl.atomic_cas(slots_ptr + slot, 0, 1) != 0:
        slot = (slot + 1) % slots
    return slot


@triton.jit
def _release(slots_ptr, slot):
    # (after the program's last access to its scratch slot)
    tl.debug_barrier()
    tl.atomic_xchg(slots_ptr + slot, 0)


@triton.jit
def _saved_logits(hist_ptr, b, t, steps, N, HAS_INIT: tl.constexpr):
    # step t's logits among the (B, steps + HAS_INIT, N, N) that forward keeps for backward: without
    # a start (PO-U) the first are zeros, which are not kept (backward takes zeros for t = 0)
    return hist_ptr + (b * (steps + HAS_INIT) + t - 1 + HAS_INIT) * N * N


@triton.jit
def _operand_C(C_ptr, staged_ptr, b, N, inside, tile, offs, STAGE_C: tl.constexpr, BLOCK: tl.constexpr):
    # where the matrix products read this set's C: the (N, N) input itself (row stride N, loads
    # masked), or, with STAGE_C, a copy zero-padded to a scratch tile (row stride BLOCK, a
    # compile-time constant, so that each thread's rows are one address plus constant offsets,
    # and no masks: see _outer_products). -> (pointer, row stride)
    if STAGE_C:
        _to_scratch(staged_ptr, tl.load(C_ptr + b * N * N + tile, mask=inside, other=0.0), offs, BLOCK)
        return staged_ptr, BLOCK
    else:
        return C_ptr + b * N * N, N


@triton.jit
def forward_kernel(C_ptr, init_ptr, mask_ptr, P_ptr, hist_ptr, halves_ptr, scratch_ptr, slots_ptr, slots, N, steps,
                   iters, temperature, HAS_INIT: tl.constexpr, HAS_MASK: tl.constexpr, SAVE: tl.constexpr,
                   STAGE_C: tl.constexpr, BLOCK: tl.constexpr, SPANS: tl.constexpr, SMALLER: tl.constexpr,
                   WIDE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    size, elsewhere = _prologue(mask_ptr, b, N, P_ptr, True, P_ptr, False, hist_ptr, halves_ptr, steps, iters,
                                HAS_INIT, SAVE, SPANS, SMALLER, BLOCK, WIDE)
    if elsewhere:
        return
    offs, inside, tile = _program(N, size, BLOCK)
    allowed = _allowed(inside, offs, N, size, mask_ptr, b, HAS_MASK)
    # scratch: the position balance (and C, with STAGE_C), in a slot held while the set is computed
    slot = _acquire(slots_ptr, b, slots)
    bal = scratch_ptr + slot.to(tl.int64) * (1 + STAGE_C) * BLOCK * BLOCK
    C, C_row = _operand_C(C_ptr, bal + BLOCK * BLOCK, b, N, inside, tile, offs, STAGE_C, BLOCK)
    if HAS_INIT:
        logits = tl.load(init_ptr + b * N * N + tile, mask=inside, other=0.0)
    else:
        logits = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for t in range(steps):
        if SAVE and (HAS_INIT or t > 0):
            tl.store(_saved_logits(hist_ptr, b, t, steps, N, HAS_INIT) + tile, logits, mask=inside)
        _, zc = _clamped(logits, allowed, temperature, iters)
        P = tl.exp(_sinkhorn(zc, halves_ptr, b, t, steps, iters, offs, N, size, SAVE))
        _to_scratch(bal, _balance(P), offs, BLOCK)
        # eq. 7 with the gradient 2 C B of eq. 4 (2 eta folded into C): (C B)_iq = sum_k C_ik B_kq
        logits = logits - _outer_products(C, 1, C_row, bal, BLOCK, 1, size, offs, BLOCK, STAGE_C)
    if SAVE:
        tl.store(_saved_logits(hist_ptr, b, steps, steps, N, HAS_INIT) + tile, logits, mask=inside)
    _release(slots_ptr, slot)
    _, zc = _clamped(logits, allowed, temperature, iters)
    P = tl.exp(_sinkhorn(zc, halves_ptr, b, steps, steps, iters, offs, N, size, SAVE))
    tl.store(P_ptr + b * N * N + tile, P, mask=inside)


@triton.jit
def backward_kernel(gP_ptr, C_ptr, mask_ptr, hist_ptr, halves_ptr, scratch_ptr, slots_ptr, slots, gC_ptr, ginit_ptr,
                    N, steps, iters, temperature, HAS_MASK: tl.constexpr, HAS_INIT: tl.constexpr,
                    WANT_INIT: tl.constexpr, STAGE_C: tl.constexpr, BLOCK: tl.constexpr, SPANS: tl.constexpr,
                    SMALLER: tl.constexpr, WIDE: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    size, elsewhere = _prologue(mask_ptr, b, N, gC_ptr, False, ginit_ptr, WANT_INIT, hist_ptr, halves_ptr, steps,
                                iters, HAS_INIT, False, SPANS, SMALLER, BLOCK, WIDE)
    if elsewhere:
        return
    offs, inside, tile = _program(N, size, BLOCK)
    allowed = _allowed(inside, offs, N, size, mask_ptr, b, HAS_MASK)
    # scratch: the position balance, the logits' gradient (and C, with STAGE_C), in a held slot
    slot = _acquire(slots_ptr, b, slots)
    bal = scratch_ptr + slot.to(tl.int64) * (2 + STAGE_C) * BLOCK * BLOCK
    gls = bal + BLOCK * BLOCK
    C, C_row = _operand_C(C_ptr, gls + BLOCK * BLOCK, b, N, inside, tile, offs, STAGE_C, BLOCK)
    gC = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    gP = tl.load(gP_ptr + b * N * N + tile, mask=inside, other=0.0)
    logits = tl.load(_saved_logits(hist_ptr, b, steps, steps, N, HAS_INIT) + tile, mask=inside, other=0.0)
    gl = _sinkhorn_backward(gP, logits, allowed, temperature, halves_ptr, b, steps, steps, iters, offs, N, size)
    for tt in range(steps):
        t = steps - 1 - tt
        if HAS_INIT or t > 0:
            logits = tl.load(_saved_logits(hist_ptr, b, t, steps, N, HAS_INIT) + tile, mask=inside, other=0.0)
        else:
            logits = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
        _, zc = _clamped(logits, allowed, temperature, iters)
        P = tl.exp(_iterates(zc, halves_ptr, b, t, steps, iters, offs, N, size))
        _to_scratch(bal, tl.trans(_balance(P)), offs, BLOCK)
        _to_scratch(gls, gl, offs, BLOCK)
        # P~(t+1) = P~(t) - C B(P) with g = dL/dP~(t+1): dL/dC = -g B^T (sum over columns q of
        # g and B), dL/dB = -C^T g (sum over rows i of C and g), dL/dP = -B(dL/dB) = B(C^T g).
        # The balance is staged transposed: the first product reads its columns, each then a
        # contiguous row of the scratch tile (see _outer_products)
        gC -= _outer_products(gls, 1, BLOCK, bal, BLOCK, 1, size, offs, BLOCK, True)
        gBP = _balance(_outer_products(C, C_row, 1, gls, BLOCK, 1, size, offs, BLOCK, STAGE_C))
        gl += _sinkhorn_backward(gBP, logits, allowed, temperature, halves_ptr, b, t, steps, iters, offs, N, size)
    _release(slots_ptr, slot)
    tl.store(gC_ptr + b * N * N + tile, gC, mask=inside)
    if WANT_INIT:
        tl.store(ginit_ptr + b * N * N + tile, gl, mask=inside)
