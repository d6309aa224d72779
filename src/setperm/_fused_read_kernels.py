"""Triton kernels of :mod:`setperm.fused_read` (imported by it on first use: this module imports Triton).

One program per block of ``BLOCK_B`` sequences runs the LSTM recurrence over their steps; the maths
is described in :mod:`setperm.fused_read`.
"""
import triton
import triton.language as tl


@triton.jit
def _rows(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    # this program's sequences, the hidden units, and which of the (BLOCK_B, BLOCK_H) tile are real
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < B
    return rows.to(tl.int64), cols, row_ok, row_ok[:, None] & (cols[None, :] < H)


@triton.jit
def _tanh(x):
    # tanh(|x|) = (1 - e) / (1 + e) with e = exp(-2 |x|) <= 1: no overflow for any x, signed after
    e = tl.exp(-2.0 * tl.abs(x))
    r = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -r, r)


@triton.jit
def _sigmoid(x):
    # 1 / (1 + exp(-x)): exp overflows to inf for x < -88 (float32), which gives exactly 0
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _store_gates(ptr, i, f, g, o, H, ok):
    # one step's four gate tiles (or their gradients) in the order i, f, g, o of a (.., 4H) row
    tl.store(ptr + 0 * H, i, mask=ok)
    tl.store(ptr + 1 * H, f, mask=ok)
    tl.store(ptr + 2 * H, g, mask=ok)
    tl.store(ptr + 3 * H, o, mask=ok)


@triton.jit
def _dot(a, b, TF32: tl.constexpr):
    if TF32:
        return tl.dot(a, b, input_precision="tf32")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _gate_products(h_ptr, h_line, h_ok, w_ptr, n, n_ok, pre_i, pre_f, pre_g, pre_o, H,
                   BLOCK_K: tl.constexpr, TF32: tl.constexpr):
    # pre_q + h_{t-1} W_q^T for the four gates q = i, f, g, o (W_q = rows [q H, (q + 1) H) of W_hh),
    # over k < H in chunks of BLOCK_K: each chunk of h_{t-1} (the program's sequences, read back
    # from global memory, where the program wrote them) is read once for the four gates, and only a
    # chunk of each W_q^T is live at a time (the weights stay in the L2 cache)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        a = tl.load(h_ptr + h_line + k[None, :], mask=h_ok & (k[None, :] < H), other=0.0)
        w = w_ptr + n * H + k[:, None]                                # W_hh[q H + n, k] at q = 0
        w_ok = n_ok & (k[:, None] < H)
        pre_i += _dot(a, tl.load(w + 0 * H * H, mask=w_ok, other=0.0), TF32)
        pre_f += _dot(a, tl.load(w + 1 * H * H, mask=w_ok, other=0.0), TF32)
        pre_g += _dot(a, tl.load(w + 2 * H * H, mask=w_ok, other=0.0), TF32)
        pre_o += _dot(a, tl.load(w + 3 * H * H, mask=w_ok, other=0.0), TF32)
    return pre_i, pre_f, pre_g, pre_o


@triton.jit
def _state_product(d_ptr, d_line, d_ok, w_ptr, n, n_ok, acc, H, BLOCK_K: tl.constexpr, TF32: tl.constexpr):
    # acc + sum over the gates q of dpre_q W_q (dpre_q: columns [q H, (q + 1) H) of the program's
    # rows at d_ptr + d_line, written by the program just before), over k < H in chunks of BLOCK_K
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        a_ok = d_ok & (k[None, :] < H)
        w_ok = n_ok & (k[:, None] < H)
        for q in tl.static_range(4):
            a = tl.load(d_ptr + d_line + q * H + k[None, :], mask=a_ok, other=0.0)
            acc += _dot(a, tl.load(w_ptr + (q * H + k[:, None]) * H + n, mask=w_ok, other=0.0), TF32)
    return acc


@triton.jit
def lstm_forward_kernel(xg_ptr, w_ptr, len_ptr, h_ptr, c_ptr, out_ptr, B, N, H,
                        SAVE: tl.constexpr, TF32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    # xg (B, N, 4H): x_t W_ih^T + b_ih + b_hh; w (4H, H): W_hh; len (B,); h (B, 2, H), zeros: h_t at
    # slot t % 2, where the next step reads it; out (B, H): the cell state after each sequence's own
    # length. SAVE: each step's activated gates i, f, g, o are written over its row of xg (each element
    # computed from the value read at its own address) and its cell into c (B, N, H), for backward;
    # the steps past the program's longest sequence get zeros in both. Steps past a sequence's length
    # hold its state; the program stops after the longest of its sequences.
    rows, cols, row_ok, ok = _rows(B, H, BLOCK_B, BLOCK_H)
    length = tl.load(len_ptr + rows, mask=row_ok, other=0)
    col_ok = cols[None, :] < H
    h = tl.zeros((BLOCK_B, BLOCK_H), xg_ptr.dtype.element_ty)
    c = tl.zeros((BLOCK_B, BLOCK_H), xg_ptr.dtype.element_ty)
    steps = tl.minimum(tl.max(length, axis=0), N)            # (a length past N reads N steps, never past them)
    for t in range(0, steps):
        line = rows * N + t                                          # (b, t) of the (B, N, ...) tensors
        x = xg_ptr + line[:, None] * (4 * H) + cols[None, :]
        # h_{t-1} W_hh^T per gate, h_{t-1} read back from its slot (zero at t = 0)
        prev = (rows * 2 + (t + 1) % 2)[:, None] * H
        pre_i, pre_f, pre_g, pre_o = _gate_products(
            h_ptr, prev, row_ok[:, None] & (t > 0), w_ptr, cols[None, :], col_ok,
            tl.load(x + 0 * H, mask=ok, other=0.0), tl.load(x + 1 * H, mask=ok, other=0.0),
            tl.load(x + 2 * H, mask=ok, other=0.0), tl.load(x + 3 * H, mask=ok, other=0.0), H, BLOCK_K, TF32)
        i = _sigmoid(pre_i)
        f = _sigmoid(pre_f)
        g = _tanh(pre_g)
        o = _sigmoid(pre_o)
        active = (t < length)[:, None]
        # (a held sequence keeps its state exactly; where, not arithmetic: its padded step may be anything)
        c = tl.where(active, f * c + i * g, c)
        h = tl.where(active, o * _tanh(c), h)
        tl.store(h_ptr + (rows * 2 + t % 2)[:, None] * H + cols[None, :], h, mask=ok)
        if SAVE:
            tl.store(c_ptr + line[:, None] * H + cols[None, :], c, mask=ok)
            _store_gates(x, i, f, g, o, H, ok)
        # h_t, written by every thread of the program, is read by all of them at the next step
        tl.debug_barrier()
    tl.store(out_ptr + rows[:, None] * H + cols[None, :], c, mask=ok)
    if SAVE:
        # backward reads every step of every row: zeros where the program ran none (no gradient there)
        zero = tl.zeros((BLOCK_B, BLOCK_H), xg_ptr.dtype.element_ty)
        for t in range(steps, N):
            line = rows * N + t
            tl.store(c_ptr + line[:, None] * H + cols[None, :], zero, mask=ok)
            _store_gates(xg_ptr + line[:, None] * (4 * H) + cols[None, :], zero, zero, zero, zero, H, ok)


@triton.jit
def lstm_backward_kernel(grad_ptr, w_ptr, len_ptr, c_ptr, gates_ptr, B, N, H,
                         TF32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    # grad (B, H): dL/dc of the final cell states; c (B, N, H) and gates (B, N, 4H): forward's, which
    # this kernel overwrites, step by step, with what the caller forms the weights' gradients from:
    # gates' row t with dL/d(pre-activation gates) at step t (zero past each length), c's row t with
    # h_{t-1} = o_{t-1} tanh(c_{t-1}) (zero at t = 0), so that dL/dW_hh = sum_t dpre_t^T h_{t-1} pairs
    # rows of the same index. Back through the steps: dh_{t-1} = dpre_t W_hh, dc_{t-1} = dc_t f_t; a
    # held step passes both through unchanged. Row t of each is overwritten at step t, after its last
    # read: at step t + 1 (c_{t-1}, o_{t-1}: before that step's barrier) and at step t (the gates: each
    # element's gradient is computed from its own gate; c_t: the store waits for the barrier).
    rows, cols, row_ok, ok = _rows(B, H, BLOCK_B, BLOCK_H)
    length = tl.load(len_ptr + rows, mask=row_ok, other=0)
    col_ok = cols[None, :] < H
    dc = tl.load(grad_ptr + rows[:, None] * H + cols[None, :], mask=ok, other=0.0).to(c_ptr.dtype.element_ty)
    dh = tl.zeros((BLOCK_B, BLOCK_H), c_ptr.dtype.element_ty)
    steps = tl.minimum(tl.max(length, axis=0), N)            # (a length past N reads N steps, never past them)
    for s in range(0, steps):
        t = steps - 1 - s
        line = rows * N + t
        gates = gates_ptr + line[:, None] * (4 * H) + cols[None, :]
        i = tl.load(gates + 0 * H, mask=ok, other=0.0)
        f = tl.load(gates + 1 * H, mask=ok, other=0.0)
        g = tl.load(gates + 2 * H, mask=ok, other=0.0)
        o = tl.load(gates + 3 * H, mask=ok, other=0.0)
        c_t = tl.load(c_ptr + line[:, None] * H + cols[None, :], mask=ok, other=0.0)
        has_prev = ok & (line > rows * N)[:, None]                       # t > 0
        c_prev = tl.load(c_ptr + (line - 1)[:, None] * H + cols[None, :], mask=has_prev, other=0.0)
        o_prev = tl.load(gates_ptr + (line - 1)[:, None] * (4 * H) + 3 * H + cols[None, :], mask=has_prev,
                         other=0.0)
        tc = _tanh(c_t)
        # h_t = o tanh(c_t), c_t = f c_{t-1} + i g
        dct = dc + dh * o * (1.0 - tc * tc)
        active = (t < length)[:, None]
        d_i = tl.where(active, dct * g * i * (1.0 - i), 0.0)
        d_f = tl.where(active, dct * c_prev * f * (1.0 - f), 0.0)
        d_g = tl.where(active, dct * i * (1.0 - g * g), 0.0)
        d_o = tl.where(active, dh * tc * o * (1.0 - o), 0.0)
        _store_gates(gates, d_i, d_f, d_g, d_o, H, ok)
        # dpre_t, written by every thread of the program, is read by all of them in the products
        tl.debug_barrier()
        # (after the barrier: every thread has read c_t of this row)
        tl.store(c_ptr + line[:, None] * H + cols[None, :], o_prev * _tanh(c_prev), mask=ok)
        # dh_{t-1} = dpre_t W_hh
        acc = _state_product(gates_ptr, line[:, None] * (4 * H), row_ok[:, None], w_ptr, cols[None, :], col_ok,
                             tl.zeros((BLOCK_B, BLOCK_H), c_ptr.dtype.element_ty), H, BLOCK_K, TF32)
        dh = tl.where(active, acc, dh)
        dc = tl.where(active, dct * f, dc)
