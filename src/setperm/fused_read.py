"""The encoder's LSTM read (:func:`setperm.encoder.last_state`, ``method="fused"``) as two Triton kernels.

The set vector is the LSTM's cell state after each sequence's own length (paper section 4.4). A
fused LSTM call (cuDNN) runs every step of the padded batch, and to stop at each length it must be
given the lengths on the host (a packed sequence) or read the padding with its state held (the
padded read); in training it also keeps its own workspace per step. Here:

- the input part of the gates, ``x_t W_ih^T + b_ih + b_hh`` for every step, is one matrix product
  (torch) into a ``(B, N, 4H)`` buffer;
- the recurrence ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)`` with ``i, f, g, o`` from
  ``x_t W_ih^T + b + h_{t-1} W_hh^T`` is one kernel: one program per block of sequences loops over
  the steps of its longest sequence, holds each sequence's state after its own length (exactly:
  a selection, not arithmetic), reads its lengths on the device (no host synchronisation) and,
  for backward, writes each step's activated gates over its input part in that buffer and its
  ``c`` beside it: ``5 H`` numbers per element in all, the buffer of the input gates included;
- backward is one kernel back through the same steps, which writes ``dL/d(pre-activation gates)``
  over the gates (zero past each length) and ``h_{t-1} = o_{t-1} tanh(c_{t-1})`` over ``c_t``; the
  gradients of the input, ``W_ih``, ``W_hh`` and the biases are matrix products of these (torch),
  so backward allocates nothing of the size of the steps but the input's gradient. A second
  backward through the same graph (``retain_graph=True``) runs the forward kernel again first.

The gates' products ``h W_hh^T`` (and ``dpre W_hh`` in backward) are ``tl.dot`` on tiles of the
program's sequences, in TF32 where torch lets cuDNN's LSTM use it
(``torch.backends.cudnn.rnn.fp32_precision``, or ``torch.backends.cudnn.allow_tf32`` on older
torch; TF32 is torch's default), else in full float32. Same values as ``nn.LSTM`` up to rounding;
float16 and bfloat16 inputs are computed in float32, float64 in float64. The kernels give
first-order gradients; a backward that is itself differentiated (second-order gradients, gradient
penalties) runs the same recurrence in torch operations (:func:`recurrence`), recomputed from the
inputs. With ``TRITON_INTERPRET=1`` set before Triton is imported the kernels run on CPU tensors
in Triton's interpreter (how the tests check them).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from ._compat import autocast_off, is_compiling, signature_kept
from ._errors import warn_once
from .masking import zero_padding
from .fused import _KernelFailure as KernelFailure
from .fused import _block, _launch, interpreted, unavailable

# Hidden units up to which the kernels apply: for sm_90, at 8 warps a program's states, gates and
# product chunks fit the registers up to a 64-unit tile and spill a few dozen bytes at 128; at 256
# every warp count spills hundreds (python -m benchmarks.fused_resources --read).
MAX_HIDDEN = 128
# Sequences per program: tl.dot's smallest tile.
BLOCK_B = 16
# Chunk of the products' inner dimension, warps per program, and software-pipelined chunks in flight:
# the compiled configuration whose resources `python -m benchmarks.fused_resources --read` reports
# (a chunk of 32 at 4 warps spilled kilobytes, and one such build crashed Triton 3.9's compiler)
BLOCK_K = 16
WARPS = 8
STAGES = 2


def applies(rnn: nn.RNNBase, seq: Tensor) -> bool:
    """Whether the fused read can compute ``rnn``'s final cell states for ``seq`` here: a one-layer,
    one-directional, batch-first ``nn.LSTM`` without projections, of at most :data:`MAX_HIDDEN`
    units, a CUDA tensor (a CPU tensor under the interpreter) of at least one sequence and one step,
    outside ``torch.compile``'s tracing (a compiled graph reads as ``"auto"`` does)."""
    on_device = seq.device.type == "cuda" or (seq.device.type == "cpu" and interpreted())
    return (isinstance(rnn, nn.LSTM) and rnn.num_layers == 1 and not rnn.bidirectional and rnn.proj_size == 0
            and rnn.batch_first and rnn.hidden_size <= MAX_HIDDEN and on_device and not is_compiling()
            and seq.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
            and seq.shape[0] > 0 and seq.shape[1] > 0)


def failure(rnn: nn.LSTM, seq: Tensor) -> Optional[str]:
    """Why the kernels cannot read ``seq`` with ``rnn`` (None: as far as is known, they can)."""
    reason = unavailable()
    if reason is not None:
        return f"the fused LSTM read needs Triton ({reason})"
    return _broken.get(_where(seq.device, rnn.hidden_size, _dtype(rnn, seq)))


def _dtype(rnn: nn.LSTM, seq: Tensor) -> torch.dtype:
    # the kernels' dtype: the wider of the input's and the weights', at least float32
    return torch.promote_types(torch.promote_types(seq.dtype, rnn.weight_ih_l0.dtype), torch.float32)


def lstm_final_cell(rnn: nn.LSTM, seq: Tensor, lengths: Tensor) -> Tensor:
    """``rnn``'s cell state after the first ``lengths[b]`` steps of each sequence ``seq[b]`` ->
    ``(B, hidden_size)`` (zero for a length of 0); the caller has checked :func:`applies` and
    :func:`failure`. Steps past a length may hold anything (they are zeroed first, so that a
    non-finite one cannot reach a gradient)."""
    N = seq.shape[1]
    lengths = lengths.to(seq.device, non_blocking=True)     # (the kernels read them where the sequences are)
    dtype = _dtype(rnn, seq)
    tf32 = dtype == torch.float32 and _rnn_tf32() and not interpreted()
    # (autocast off: the products in forward and backward in dtype, as the kernels compute)
    with autocast_off(seq.device.type):
        real = torch.arange(N, device=seq.device) < lengths.unsqueeze(1)
        x = zero_padding(seq.to(dtype), real)
        bias = (rnn.bias_ih_l0 + rnn.bias_hh_l0).to(dtype) if rnn.bias else None
        w_ih, w_hh = rnn.weight_ih_l0.to(dtype), rnn.weight_hh_l0.to(dtype)
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_ih, w_hh, bias))
        return _FusedLSTMRead.apply(x.contiguous(), w_ih.contiguous(), w_hh.contiguous(), bias, lengths.contiguous(),
                                    save, tf32)[0]


def recurrence(x: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], lengths: Tensor) -> Tensor:
    """The kernels' function written with torch operations, one step at a time: the cell state
    after each sequence's length, each step past it holding the state. What a backward that is
    itself differentiated runs (second-order gradients, gradient penalties)."""
    B, N = x.shape[:2]
    xg = _input_gates(x, w_ih, bias)
    h = c = x.new_zeros(B, w_hh.shape[1])
    for t in range(N):
        i, f, g, o = (xg[:, t] + h @ w_hh.t()).chunk(4, dim=-1)
        c_t = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_t = torch.sigmoid(o) * torch.tanh(c_t)
        active = (t < lengths).unsqueeze(1)
        c, h = torch.where(active, c_t, c), torch.where(active, h_t, h)
    return c


def _input_gates(x: Tensor, w_ih: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x_t W_ih^T + b`` for every step at once ``(B, N, 4H)``: the input part of the gates."""
    if bias is None:
        return x @ w_ih.t()
    # (one product with the bias added in place: a single (B, N, 4H) buffer)
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), w_ih.t()).view(*x.shape[:-1], -1)


def _rnn_tf32() -> bool:
    """Whether torch lets cuDNN's LSTM round float32 products to TF32 (the kernels do as the LSTM they
    replace): the RNN precision where torch has per-backend precisions (``"none"`` inherits from
    cuDNN's, then the global one), else ``torch.backends.cudnn.allow_tf32``."""
    b = torch.backends
    for part in (getattr(b.cudnn, "rnn", None), b.cudnn, b):
        precision = getattr(part, "fp32_precision", None)
        if precision is not None and precision != "none":
            return precision == "tf32"
    return bool(b.cudnn.allow_tf32)


def _where(device: torch.device, hidden: int, dtype: torch.dtype) -> Tuple:
    return (str(device), _block(hidden), dtype == torch.float64)


# (device, hidden tile, float64) -> why Triton could not build or launch a kernel there: later calls
# read the padded way at once (warned once per reason)
_broken: Dict[Tuple, str] = {}
_warned: set = set()


def warn_fallback(reason: str) -> None:
    """Warn once per reason that the padded read stands in for the kernels."""
    warn_once(_warned, reason, f"setperm: {reason}; the padded LSTM read computes the same values instead")


def _run(kernel, x: Tensor, hidden: int, programs: int, *args, **meta) -> None:
    where = _where(x.device, hidden, x.dtype)
    try:
        _launch(kernel, programs, *args, context="the fused LSTM read", tile=f"{meta['BLOCK_H']} hidden units",
                **meta)
    except KernelFailure as err:
        _broken[where] = str(err)
        raise


class _FusedLSTMRead(torch.autograd.Function):
    # forward and setup_context apart (not forward(ctx, ...)), as torch.func's transforms take them

    @staticmethod
    @signature_kept
    def forward(x: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], lengths: Tensor, save: bool,
                tf32: bool) -> Tuple[Tensor, ...]:
        return _forward(x, w_ih, w_hh, bias, lengths, save, tf32)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w_ih, w_hh, bias, lengths, save, tf32 = inputs
        _, c, gates = output
        ctx.mark_non_differentiable(c, gates)
        ctx.set_materialize_grads(False)
        ctx.tf32 = tf32
        # backward overwrites c and gates with what it forms the weights' gradients from; a second
        # backward through the same graph (retain_graph=True) recomputes them first
        ctx.spent = False
        ctx.save_for_backward(x, w_ih, w_hh, bias, lengths, c, gates)

    @staticmethod
    def backward(ctx, grad_c, *_):
        if grad_c is None:
            return None, None, None, None, None, None, None
        with autocast_off(grad_c.device.type):          # (a backward called under autocast)
            return _backward(ctx, grad_c)


def _forward(x: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], lengths: Tensor, save: bool,
             tf32: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The final cells ``(B, H)``; with ``save``, each step's cell ``(B, N, H)`` and activated gates
    ``(B, N, 4H)``, the latter written over the input gates' buffer (5 H numbers per element in all;
    zeros past the steps each program runs)."""
    B, N = x.shape[:2]
    H = w_hh.shape[1]
    gates = _input_gates(x, w_ih, bias)
    out = x.new_empty(B, H)
    h = x.new_zeros(B, 2, H)                     # (two slots for h, which the steps take in turn)
    c = x.new_empty(B, N, H) if save else h
    _run(_kernels().lstm_forward_kernel, x, H, -(-B // BLOCK_B), gates, w_hh, lengths, h, c, out, B, N, H,
         SAVE=save, TF32=tf32, BLOCK_B=BLOCK_B, BLOCK_H=_block(H), BLOCK_K=BLOCK_K, num_warps=WARPS,
         num_stages=STAGES)
    return out, (c if save else h), (gates if save else h)


def _backward(ctx, grad_c: Tensor) -> Tuple[Optional[Tensor], ...]:
    x, w_ih, w_hh, bias, lengths, c, gates = ctx.saved_tensors
    if torch.is_grad_enabled():
        # a backward that is itself differentiated: the kernels give first-order gradients only,
        # so these come from the same recurrence in torch operations, recomputed from the inputs
        # (which carry their own graphs, so the gradients are functions of them)
        needs = ctx.needs_input_grad[:4]
        with torch.enable_grad():
            inputs = [t if t is None or t.requires_grad or not need else t.detach().requires_grad_()
                      for t, need in zip((x, w_ih, w_hh, bias), needs)]
            grads = iter(torch.autograd.grad(recurrence(*inputs, lengths),
                                             [t for t, need in zip(inputs, needs) if need], grad_c,
                                             create_graph=True))
        return (*(next(grads) if need else None for need in needs), None, None, None)
    if ctx.spent:
        _, c, gates = _forward(x, w_ih, w_hh, bias, lengths, True, ctx.tf32)
    ctx.spent = True
    B, N, H = c.shape
    # afterwards gates holds dL/d(pre-activation gates) and c holds h_{t-1} at each step t
    _run(_kernels().lstm_backward_kernel, x, H, -(-B // BLOCK_B), grad_c.to(c.dtype).contiguous(), w_hh,
         lengths, c, gates, B, N, H, TF32=ctx.tf32, BLOCK_B=BLOCK_B, BLOCK_H=_block(H), BLOCK_K=BLOCK_K,
         num_warps=WARPS, num_stages=STAGES)
    dpre, h_prev = gates.view(B * N, 4 * H), c.view(B * N, H)
    need_x, need_ih, need_hh, need_bias = ctx.needs_input_grad[:4]
    grad_x = (dpre @ w_ih).view(B, N, -1) if need_x else None
    grad_ih = dpre.t() @ x.reshape(B * N, -1) if need_ih else None
    # dL/dW_hh = sum over sequences and steps of dpre_t^T h_{t-1}
    grad_hh = dpre.t() @ h_prev if need_hh else None
    grad_bias = dpre.sum(0) if need_bias else None
    return grad_x, grad_ih, grad_hh, grad_bias, None, None, None


def _kernels():
    """The Triton kernels, imported on first use (Triton is imported only then)."""
    from . import _fused_read_kernels

    return _fused_read_kernels
