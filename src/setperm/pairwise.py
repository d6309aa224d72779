"""The two-layer pairwise MLP of the ordering cost, evaluated without building pairs.

``g[b, i, j, :] = relu(a[b, i] + c[b, j]) @ w2^T`` with ``a = W_a x_i + b``, ``c = W_b x_j`` (the
first layer of f on ``[x_i; x_j]`` split in two, paper eq. 8). ``g`` costs ``B N^2 H`` work in
forward and backward whatever we do; what can be saved is memory traffic: the ``(B, N, N, H)``
hidden activations are never stored, only recomputed. Two interchangeable kernels compute the
same function and the same exact gradients:

- ``"chunked"``: plain PyTorch operations over cache-sized chunks, reusing one buffer;
  runs anywhere, differentiable twice.
- ``"compiled"``: the same maths written as broadcast-and-reduce expressions and compiled by
  ``torch.compile`` (inductor), which fuses each reduction with its broadcast into one loop nest,
  so the hidden activations only ever live in registers. Faster than ``"chunked"`` after a
  one-off compilation per dtype/device on first use (shapes are dynamic); measured speed-ups, and
  the configurations where the pairwise MLP is too small for it to matter, are in
  ``benchmarks/README.md``. Needs a working inductor backend (a C++ compiler on CPU, Triton on
  CUDA). Double backward runs the chunked contractions. The cost that consumes the MLP
  (:func:`setperm.functional.pairwise_cost`) runs eq. 8 and 10 after it (``g - g^T``, the zeros of
  equal elements and padding, the normalisation) the same way: with ``"compiled"`` in the same
  compiled function as the MLP (one forward, one backward), with ``"chunked"`` as plain operations.
- ``"auto"`` (the default of every module): resolved per call from the device of the inputs,
  ``"compiled"`` on CUDA (there the chunked kernel's many small launches dominate the time) and
  ``"chunked"`` elsewhere (on the CPU the chunked kernel needs no compilation and is the measured
  default of ``benchmarks/README.md``). When the compiled kernel cannot be built (no Triton, no
  compiler), ``"auto"`` warns once naming the reason and computes the same values with
  ``"chunked"``; an explicit ``"compiled"`` raises instead.
- ``"fused"``: the pairwise MLP as ``"compiled"`` (falling back as ``"auto"`` does), and the
  unrolled permutation optimisation that consumes the cost as two Triton kernels on CUDA
  (:mod:`setperm.fused`; the kernel argument of :func:`setperm.functional.optimize_permutation`).

Inside a ``torch.compile`` of a larger function (``torch.compiler.is_compiling()``), every kernel's
pairwise MLP is traced as the fused broadcast-and-reduce expressions, which the outer compilation
fuses itself (the chunked kernel's preallocated buffers and ``out=`` calls would break its graph);
``"fused"``'s optimisation kernels stay Triton kernels there, as operators of the graph.
"""
from __future__ import annotations

import functools
import os
import sysconfig
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ._compat import autocast_off, compiler_errors, hit_recompile_limit, is_compiling, signature_kept
from ._errors import user_stacklevel

KERNELS = ("auto", "chunked", "compiled", "fused")

# Elements per chunk of the (sets, rows, N, hidden) pairwise activations: small enough that a
# chunk stays in the per-core L2 cache (1 MiB in float32), so its elementwise passes do not go to
# DRAM, and one preallocated buffer is reused (no page faults from fresh large allocations);
# large enough that the per-chunk Python overhead stays small against the arithmetic.
_CHUNK_ELEMENTS = 1 << 18


def _rows_per_chunk(B: int, N: int, H: int) -> int:
    return max(1, min(N, _CHUNK_ELEMENTS // max(1, B * N * H)))


def _sets_per_chunk(B: int, N: int, H: int) -> int:
    """Whole sets per chunk (>= 1) when one set fits a chunk, else 0 (row blocks of one set)."""
    per_set = max(1, N * N * H)
    return min(B, _CHUNK_ELEMENTS // per_set) if per_set <= _CHUNK_ELEMENTS else 0


def _chunks(B: int, N: int, H: int):
    """Yield ``(b0, b1, i0, i1)`` in order: several whole sets per chunk, or row blocks of one set."""
    step = _sets_per_chunk(B, N, H)
    if step:
        for b0 in range(0, B, step):
            yield b0, min(B, b0 + step), 0, N
    else:
        rows = _rows_per_chunk(1, N, H)
        for b in range(B):
            for i0 in range(0, N, rows):
                yield b, b + 1, i0, min(N, i0 + rows)


def _chunk_buffer(a: Tensor, B: int, N: int, H: int) -> Tensor:
    step = _sets_per_chunk(B, N, H)
    return a.new_empty(step, N, N, H) if step else a.new_empty(1, _rows_per_chunk(1, N, H), N, H)


def _relu_mask(a: Tensor, neg_c: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``1[a_i + c_j > 0]`` as a float 0/1 tensor in one pass (``a_i > -c_j``), detached: relu' is
    piecewise constant, so no gradient flows through it."""
    if out is None:
        return torch.gt(a, neg_c).to(a.dtype)
    return torch.gt(a, neg_c, out=out)


def element_projections(x: Tensor, w_a: Tensor, w_b: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """``a = x W_a^T + bias`` and ``c = x W_b^T`` ``(B, N, H)``: the first layer of f on ``[x_i; x_j]``
    split over the pair (eq. 8), once per element; ``bias`` broadcasts to ``a`` (or None).

    Computed with autocast off, in the wider of the dtypes of ``x`` and the weights (they differ
    only under autocast, which admits a half-precision ``x`` for a float32 module and the reverse):
    backward recomputes them from the same inputs (:func:`pairwise_two_layer`'s ``projections``),
    where autocast is off, and the two must agree bit for bit (they decide ``relu``'s mask). The
    projections cost ``B N D H`` multiply-adds, nothing beside the ``B N^2 H`` of the pairs."""
    dtype = torch.promote_types(x.dtype, w_a.dtype)
    x = x.to(dtype)
    with autocast_off(x.device.type):
        a = x @ w_a.to(dtype).t()
        if bias is not None:
            a = a + bias
        c = x @ w_b.to(dtype).t()
    return a, c.to(a.dtype)


class _PairwiseTwoLayer(torch.autograd.Function):
    """g[b, i, j, :] = relu(a[b, i] + c[b, j]) @ w2^T  without storing the (B, N, N, H) hidden.

    Backward uses ``m_ijh = relu'(a_ih + c_jh) = 1[a_ih + c_jh > 0]`` (recomputed per chunk) and
    only two contractions with it,
        T1[i, k, h] = sum_j go[i, j, k] m[i, j, h],   T2[j, k, h] = sum_i go[i, j, k] m[i, j, h],
    giving ``grad_a = T1 . w2``, ``grad_c = T2 . w2`` and, because ``relu(p) = m p`` with
    ``p = a_i + c_j``, ``grad_w2[k, h] = sum_i a[i, h] T1[i, k, h] + sum_j c[j, h] T2[j, k, h]``
    exactly, without another pass over the hidden activations. The backward is differentiable
    (double backward) through ``grad_out``, ``a``, ``c`` and ``w2``. Forward and ``setup_context``
    apart, so that ``torch.func`` transforms (``grad``, ``vjp``) differentiate it.

    Given the inputs of :func:`element_projections` that gave ``a`` and ``c`` (``x``, ``w_a``,
    ``w_b``, ``bias``; they get no gradient here: theirs flows through ``a`` and ``c``), backward
    keeps those instead of ``a`` and ``c`` and recomputes the two: ``B N D`` floats kept instead of
    ``2 B N H`` (the elements' features against the hidden width).
    """

    @staticmethod
    @signature_kept
    def forward(a: Tensor, c: Tensor, w2: Tensor, kernel: str, x: Optional[Tensor], w_a: Optional[Tensor],
                w_b: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        return _two_layer_forward(a, c, w2, kernel)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, c, w2, ctx.kernel, x, w_a, w_b, bias = inputs
        ctx.recompute = x is not None
        ctx.save_for_backward(*((x, w_a, w_b, bias, w2) if ctx.recompute else (a, c, w2)))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.recompute:
            # (with create_graph, a graph from the kept inputs: a second derivative reaches them
            # through the recomputed a and c as it would through the forward's)
            x, w_a, w_b, bias, w2 = ctx.saved_tensors
            a, c = element_projections(x, w_a, w_b, bias)
        else:
            a, c, w2 = ctx.saved_tensors
        return (*_two_layer_backward(a, c, w2, grad_out, ctx.kernel), *(None,) * 5)   # (kernel, projections)


def _two_layer_forward(a: Tensor, c: Tensor, w2: Tensor, kernel: str) -> Tensor:
    """``g`` ``(B, N, N, K)`` by ``kernel`` (as :func:`kernel_to_call` resolved it): the compiled
    function, or the chunked loop (also where the compiled one is refused)."""
    if is_compiling():
        return _fused_forward(a, c, w2)
    if kernel != "chunked":
        out = _call_compiled(_fused_forward, a, c, w2, fall_back=kernel == "auto-compiled")
        if out is not None:
            return out
    B, N, H = a.shape
    K = w2.shape[0]
    out = a.new_empty(B, N, N, K)
    w2t = w2.t()
    buf = _chunk_buffer(a, B, N, H)
    for b0, b1, i0, i1 in _chunks(B, N, H):
        h = buf[:b1 - b0, :i1 - i0]                                             # (s, r, N, H)
        torch.add(a[b0:b1, i0:i1, None, :], c[b0:b1, None, :, :], out=h)
        h.relu_()
        torch.matmul(h, w2t, out=out[b0:b1, i0:i1])
    return out


def _two_layer_backward(a: Tensor, c: Tensor, w2: Tensor, grad_out: Tensor, kernel: str):
    """``grad_a``, ``grad_c``, ``grad_w2`` of :func:`_two_layer_forward` for the gradient ``grad_out``
    of ``g``: the compiled function or the chunked contractions; recorded (differentiable) ones
    when grad mode is on (a backward with ``create_graph``)."""
    grad_out = grad_out.contiguous()     # it arrives as a permuted view (movedim, g - g^T)
    if is_compiling():
        return _fused_backward(a, c, w2, grad_out)
    if torch.is_grad_enabled():          # create_graph: record the contractions (no out=)
        T1, T2 = _contractions_recorded(a, c, grad_out)
    else:
        grads = (_call_compiled(_fused_backward, a, c, w2, grad_out, fall_back=kernel == "auto-compiled")
                 if kernel != "chunked" else None)
        if grads is not None:
            return grads
        T1, T2 = _contractions(a, c, grad_out)
    return _grads_from_contractions(a, c, w2, T1, T2)


def _grads_from_contractions(a: Tensor, c: Tensor, w2: Tensor, T1: Tensor, T2: Tensor):
    """``grad_a``, ``grad_c``, ``grad_w2`` from the contractions T1, T2 ``(B, N, K, H)`` (both kernels).

    Elementwise products and reductions over (set, element): einsum would lower the grad_w2
    contractions to a batched matmul over h with 1 x (B N) operands and copies, which cost more
    than the whole pairwise backward.
    """
    grad_a = (T1 * w2).sum(2)
    grad_c = (T2 * w2).sum(2)
    grad_w2 = (a.unsqueeze(2) * T1).sum((0, 1)) + (c.unsqueeze(2) * T2).sum((0, 1))
    return grad_a, grad_c, grad_w2


def _contractions(a: Tensor, c: Tensor, grad_out: Tensor):
    """T1, T2 ``(B, N, K, H)`` of :class:`_PairwiseTwoLayer` into preallocated outputs (no graph)."""
    B, N, H = a.shape
    K = grad_out.shape[-1]
    T1 = a.new_empty(B, N, K, H)
    T2 = a.new_zeros(B, N, K, H)
    neg_c = -c
    go_t = grad_out.transpose(-1, -2).contiguous()                              # (B, N, K, N)
    buf = _chunk_buffer(a, B, N, H)
    prod = torch.empty_like(buf) if K > 1 else None
    for b0, b1, i0, i1 in _chunks(B, N, H):
        s, r = b1 - b0, i1 - i0
        m = _relu_mask(a[b0:b1, i0:i1, None, :], neg_c[b0:b1, None, :, :], out=buf[:s, :r])
        # T1: one contiguous batched matmul over (set, row i), contracting j.
        torch.bmm(go_t[b0:b1, i0:i1].view(s * r, K, N), m.view(s * r, N, H), out=T1[b0:b1, i0:i1].view(s * r, K, H))
        # T2 contracts i, which is not the inner dim of m: an in-place product and a reduction over
        # the cache-resident chunk beat a strided batched matmul (which falls back to a loop).
        for k in range(K):
            go_k = grad_out[b0:b1, i0:i1, :, k:k + 1]                           # (s, r, N, 1)
            pk = m.mul_(go_k) if k == K - 1 else torch.mul(m, go_k, out=prod[:s, :r])
            T2[b0:b1, :, k] += pk.sum(1)
    return T1, T2


def _contractions_recorded(a: Tensor, c: Tensor, grad_out: Tensor):
    """Same as :func:`_contractions` with differentiable (out-of-place) operations."""
    B, N, H = a.shape
    neg_c = -c.detach()
    t1_sets, t2_sets = [], []
    for b0, b1, i0, i1 in _chunks(B, N, H):
        m = _relu_mask(a.detach()[b0:b1, i0:i1, None, :], neg_c[b0:b1, None, :, :])
        go = grad_out[b0:b1, i0:i1]
        t1 = torch.matmul(go.transpose(-1, -2), m)                              # (s, r, K, H)
        t2 = torch.matmul(go.permute(0, 2, 3, 1), m.transpose(1, 2))            # (s, N, K, H)
        if i0 == 0:
            t1_sets.append([t1])
            t2_sets.append(t2)
        else:
            t1_sets[-1].append(t1)
            t2_sets[-1] = t2_sets[-1] + t2
    T1 = torch.cat([torch.cat(parts, dim=1) for parts in t1_sets], dim=0)
    return T1, torch.cat(t2_sets, dim=0)


def check_kernel(kernel: str) -> str:
    """Validate a ``kernel`` argument (public boundary of the cost modules)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def resolve_kernel(kernel: str, device: torch.device) -> str:
    """The pairwise MLP's kernel for ``kernel`` on ``device``: ``"auto"`` -> ``"compiled"`` on CUDA,
    else ``"chunked"``; ``"fused"`` -> ``"compiled"`` on every device; for both ``"chunked"`` instead
    where the compiled kernel cannot be built there (warned once, see :func:`fused_unavailable`).
    ``"chunked"`` and ``"compiled"`` are returned as they are."""
    if kernel in ("chunked", "compiled"):
        return kernel
    device_type = torch.device(device).type
    if (kernel == "auto" and device_type != "cuda") or _auto_fallback.get(device_type):
        return "chunked"
    reason = fused_unavailable(device_type)
    if reason is not None:
        _fall_back(device_type, reason)
        return "chunked"
    return "compiled"


def kernel_to_call(kernel: str, device: torch.device) -> str:
    """What a call with ``kernel`` on ``device`` runs: ``"chunked"``, ``"compiled"`` (a failed build
    raises) or ``"auto-compiled"`` (``"auto"`` and ``"fused"`` where they take the compiled kernel: a
    failed build warns once and falls back to ``"chunked"``). Inside a ``torch.compile`` of a larger
    function, ``"compiled"``: the fused expressions are traced into it (see the module docstring)."""
    if is_compiling():
        return "compiled"
    resolved = resolve_kernel(kernel, device)
    return "auto-compiled" if kernel in ("auto", "fused") and resolved == "compiled" else resolved


# device type -> why the compiled kernel could not be built there ("auto" and "fused" warn once per
# device type, then take the chunked kernel)
_auto_fallback: dict = {}


def _fall_back(device_type: str, reason: str) -> None:
    if device_type not in _auto_fallback:
        warnings.warn(f"setperm: the compiled pairwise kernel cannot be built on {device_type} ({reason}); "
                      "kernel='auto' and 'fused' use kernel='chunked' for it instead (same values, slower)",
                      RuntimeWarning, stacklevel=user_stacklevel())
    _auto_fallback[device_type] = reason


def fused_unavailable(device_type: str) -> Optional[str]:
    """Why ``torch.compile``'s inductor cannot build the fused kernel on ``device_type`` (None if
    it can, as far as can be told without compiling): on CUDA it generates Triton kernels."""
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:          # pragma: no cover - torch without the helper
            return None
        if not has_triton():
            return "Triton is not installed or does not support this GPU"
    return None


def pairwise_two_layer(a: Tensor, c: Tensor, w2: Tensor, kernel: str = "auto",
                       projections: Optional[Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]] = None) -> Tensor:
    """``g[b,i,j] = relu(a[b,i] + c[b,j]) @ w2^T`` for ``a, c`` (B, N, H), ``w2`` (K, H) -> (B, N, N, K).

    Memory-lean: the ``(B, N, N, H)`` hidden activations are recomputed in backward, never stored;
    with ``projections``, the ``(x, w_a, w_b, bias)`` from which :func:`element_projections` gave
    ``a`` and ``c``, so are ``a`` and ``c`` (backward keeps ``x`` instead).
    ``kernel`` is ``"auto"`` (per device), ``"chunked"`` (plain PyTorch) or ``"compiled"``
    (torch.compile-fused loops, see the module docstring; ``"fused"`` evaluates the MLP as
    ``"compiled"``); all give the same values up to float
    rounding and are differentiable twice (the double backward runs the chunked contractions).
    """
    check_kernel(kernel)
    if a.dim() != 3 or c.shape != a.shape:
        raise ValueError(f"a and c must have the same shape (B, N, H), got {tuple(a.shape)} and {tuple(c.shape)}")
    if w2.dim() != 2 or w2.shape[1] != a.shape[2]:
        raise ValueError(f"w2 must have shape (K, {a.shape[2]}), got {tuple(w2.shape)}")
    kernel = kernel_to_call(kernel, a.device)
    # One dtype for every kernel: under autocast a, c and w2 may differ (a half-precision c with a
    # float32 a, a float32 a with a half-precision module's w2), and neither the fused loops nor
    # the chunked products into preallocated outputs promote.
    c, w2 = c.to(a.dtype), w2.to(a.dtype)
    return _PairwiseTwoLayer.apply(a, c, w2, kernel, *(projections if projections is not None else (None,) * 4))


# ----------------------------------------------------------------------------- compiled kernel
def _fused_forward(a: Tensor, c: Tensor, w2: Tensor) -> Tensor:
    hidden = torch.relu(a.unsqueeze(2) + c.unsqueeze(1))                 # (B, N, N, H), fused away
    return (hidden.unsqueeze(-2) * w2).sum(-1)                           # (B, N, N, K)


def _fused_backward(a: Tensor, c: Tensor, w2: Tensor, grad_out: Tensor):
    # Same contractions as _PairwiseTwoLayer.backward; 1[a + c > 0] equals the chunked kernel's
    # 1[a > -c] exactly (a rounded sum of two floats is 0 only if they cancel exactly, and it is
    # the same sum either way round). Each contraction is its own product with one reduction
    # (T2 by the transposed pairs, summed over i as T1 over j): inductor then keeps every
    # (B, N, N, K, H) product inside its reduction's loop. With one product summed twice it
    # must choose, and inside a larger compiled graph (a model under torch.compile, where a and
    # c are computed in the same graph) it wrote the whole product to memory and read it back
    # twice: B N^2 K H floats (benchmarks/README.md, "The encoder inside a model's torch.compile").
    relu_t1 = (a.unsqueeze(2) + c.unsqueeze(1) > 0).to(a.dtype)          # (B, N_i, N_j, H)
    relu_t2 = (c.unsqueeze(2) + a.unsqueeze(1) > 0).to(a.dtype)          # (B, N_j, N_i, H)
    T1 = (grad_out.unsqueeze(-1) * relu_t1.unsqueeze(3)).sum(2)          # (B, N, K, H): over j
    T2 = (grad_out.transpose(1, 2).unsqueeze(-1) * relu_t2.unsqueeze(3)).sum(2)     # over i
    return _grads_from_contractions(a, c, w2, T1, T2)


@functools.lru_cache(maxsize=None)
def _compiled(fn: Callable):
    """The torch.compile wrapper of one pure function, created on first use.

    ``dynamic=True``: one kernel serves every set size, batch size and hidden width (a model with
    variable-size sets would otherwise recompile per new shape); dtype, device and sizes 0/1 (one
    cost channel) still make their own specialisations.
    """
    return torch.compile(fn, fullgraph=True, dynamic=True)


def _call_compiled(fn: Callable, *args, fall_back: bool = False, what: str = "the pairwise MLP"):
    """Run ``fn`` compiled (tensors passed detached; None and numbers as they are); None when dynamo
    refuses to compile one more specialisation (its recompile limit, warned naming ``what``), in
    which case the caller computes the same values with plain operations.
    A failed build raises (explicit ``kernel="compiled"``), or with ``fall_back`` (``"auto"``,
    ``"fused"``) warns once naming the reason and returns None, and both stop trying on that device."""
    # Plain tensors: dynamo compiles nn.Parameter shapes as static, which would specialise the
    # kernel to one hidden width (and recompile for every other model).
    args = tuple(t.detach() if isinstance(t, Tensor) else t for t in args)
    try:
        compiled = _compiled(fn)
    except RuntimeError as err:          # torch.compile refuses this Python (torch 2.0 on Python 3.11)
        return _build_failed(err, args[0].device.type, fall_back)
    try:
        return compiled(*args)
    except compiler_errors() as err:
        return _build_failed(err, args[0].device.type, fall_back)
    except Exception as err:
        if not hit_recompile_limit(err):
            raise
        warnings.warn(f"setperm kernel='compiled': torch.compile's recompile limit was reached for {what} "
                      f"({fn.__name__}: too many input specialisations in one process); falling back to plain "
                      "operations for the new ones (same values, slower)", RuntimeWarning,
                      stacklevel=user_stacklevel())
        return None


class KernelBuildError(RuntimeError):
    """An explicit ``kernel="compiled"`` could not be built by ``torch.compile`` on this machine
    (the message names the cause; ``kernel="chunked"`` computes the same values)."""


def library_dir_with_space() -> Optional[str]:
    """torch's or Python's library folder where it holds whitespace, else None: inductor links its
    CPU kernels with ``-L`` to both, and some torch releases (2.13 among them) write those unquoted,
    so every CPU build then fails in the linker ("cannot find -ltorch")."""
    for path in (os.path.join(os.path.dirname(torch.__file__), "lib"), sysconfig.get_config_var("LIBDIR") or ""):
        if any(ch.isspace() for ch in path):
            return path
    return None


def build_error_cause(err: BaseException) -> str:
    """The first line of what ``torch.compile`` reported, with the class of the error that dynamo
    or inductor wrapped (``"CppCompileError: C++ compile error"``)."""
    inner = getattr(err, "inner_exception", None) or err       # (dynamo and inductor wrap the cause)
    lines = [line for line in str(inner).splitlines() if line.strip()]
    return (f"{type(inner).__name__}: " if inner is not err else "") + (lines[0] if lines else repr(inner))


def _build_failed(err: Exception, device_type: str, fall_back: bool) -> None:
    """A compiled kernel could not be built: raise a clear error, or with ``fall_back`` warn once
    (per device type) and return None."""
    cause = build_error_cause(err)
    spaced = library_dir_with_space() if device_type == "cpu" else None
    if spaced is not None:
        cause += (f"; the likely reason: {spaced!r} holds a space, and some torch releases do not quote the "
                  "library folders on inductor's link line: install Python and torch under a path without spaces")
    if fall_back:
        _fall_back(device_type, f"{type(err).__name__}: {cause}")
        return None
    raise KernelBuildError(
        f"kernel='compiled' could not be compiled by torch.compile ({type(err).__name__}); inductor "
        "needs a working C++ compiler on CPU (Triton on CUDA). Use kernel='chunked' (the default), "
        f"which computes the same values. Cause: {cause}"
    ) from err
