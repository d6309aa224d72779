"""Validation of the public inputs and the one mask convention of the package.

``mask`` is a ``(B, N)`` bool tensor, **True = real element**. Variable-size sets are padded to a
common ``N``; ``lengths`` ``(B,)`` may be given instead when the real elements are a prefix, or
``key_padding_mask`` ``(B, N)`` with the opposite orientation (True = padding), as PyTorch's
attention modules take it. :func:`resolve_mask` turns any of the three into ``mask``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._compat import autocast_enabled, is_compiling
from ._errors import check_same_device


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def check_set(x: Tensor, name: str = "x", *, min_dim: int = 3, max_dim: Optional[int] = 3,
              features: Optional[int] = None) -> None:
    """``x`` must be a floating tensor of shape ``(B, N, D)`` (or more trailing dims if allowed),
    with ``D == features`` when given."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim or (max_dim is not None and x.dim() > max_dim):
        want = "(B, N, D)" if max_dim == 3 else "(B, N, ...)"
        raise ValueError(f"{name} must have shape {want}, got shape {_shape(x)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if features is not None and x.shape[-1] != features:
        raise ValueError(f"{name} must have {features} features in its last dim, got shape {_shape(x)}")


def resolve_mask(x: Tensor, mask: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                 key_padding_mask: Optional[Tensor] = None, *, name: str = "x",
                 batch_shape: Optional[Tuple[int, int]] = None) -> Optional[Tensor]:
    """Check the padding of ``x`` and return it as a ``(B, N)`` bool mask, True = real element.

    The padding may be given in one of three forms (at most one of them):

    - ``mask`` ``(B, N)`` bool, True = real element (the package's convention);
    - ``lengths`` ``(B,)`` integers: the real elements are the first ``lengths[b]`` (prefix padding);
    - ``key_padding_mask`` ``(B, N)`` bool, True = **padding**, as ``nn.MultiheadAttention`` and
      ``nn.Transformer`` name and orient it.

    ``batch_shape`` is ``(B, N)``, by default ``x.shape[:2]``. Returns None when no padding is
    given (every element is real).
    """
    B, N = batch_shape if batch_shape is not None else (x.shape[0], x.shape[1])
    given = [k for k, v in (("mask", mask), ("lengths", lengths), ("key_padding_mask", key_padding_mask))
             if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of mask / lengths / key_padding_mask, got {' and '.join(given)}")
    if mask is not None:
        return _check_bool_mask(mask, "mask", "True = real element", B, N, x, name)
    if key_padding_mask is not None:
        padding = _check_bool_mask(key_padding_mask, "key_padding_mask", "True = padding", B, N, x, name)
        # nn.MultiheadAttention's orientation (True = padding) flipped to the package's (True = real)
        return ~padding
    if lengths is not None:
        if not isinstance(lengths, Tensor):
            try:
                lengths = torch.as_tensor(lengths)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"lengths must be an integer tensor of shape (B,), got {lengths!r}") from None
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.is_complex():
            raise ValueError(f"lengths must be an integer tensor, got dtype {lengths.dtype}")
        if lengths.is_meta:
            # (their range is checked on the host below, and torch cannot read a meta tensor there)
            raise ValueError("lengths is on the meta device, which holds no values to read the set sizes from: "
                             "give them on the CPU (they serve a meta x too), or give a mask")
        if tuple(lengths.shape) != (B,):
            raise ValueError(f"lengths must have shape (B,) = {(B,)} to match {name} {_shape(x)}, "
                             f"got shape {_shape(lengths)}")
        if B and (int(lengths.min()) < 0 or int(lengths.max()) > N):
            raise ValueError(f"lengths must lie in [0, N={N}], got min {int(lengths.min())} and max {int(lengths.max())}")
        lengths = _to_device_of(lengths, x)
        return torch.arange(N, device=x.device) < lengths.unsqueeze(1)
    return None


def _check_bool_mask(m: Tensor, arg: str, meaning: str, B: int, N: int, x: Tensor, name: str) -> Tensor:
    if not isinstance(m, Tensor):
        raise ValueError(f"{arg} must be a torch.Tensor, got {type(m).__name__}")
    if m.dtype != torch.bool:
        raise ValueError(f"{arg} must be a bool tensor ({meaning}), got dtype {m.dtype}")
    if tuple(m.shape) != (B, N):
        raise ValueError(f"{arg} must have shape (B, N) = {(B, N)} to match {name} {_shape(x)}, got shape {_shape(m)}")
    if m.is_meta and not x.is_meta:
        # a mask on another device is moved to x's; one on meta has no values to move
        raise ValueError(f"{arg} is on meta but {name} is on {x.device}: a meta tensor holds no values, give "
                         f"{arg} on {x.device}")
    return _to_device_of(m, x)


def _to_device_of(t: Tensor, x: Tensor) -> Tensor:
    """``t`` on ``x``'s device. non_blocking: a host mask or host lengths reach a CUDA x without a
    synchronising copy (torch stages a pageable source before the call returns); not towards the
    CPU, where a non-blocking copy from a GPU may be read on the host before it has arrived."""
    return t.to(x.device, non_blocking=x.device.type != "cpu" or t.device.type == "cpu")


def module_dtype(module: torch.nn.Module) -> Optional[torch.dtype]:
    """The dtype of the module's first floating-point parameter (None without parameters)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def check_module_device(t: Tensor, module: torch.nn.Module, name: str = "x") -> None:
    """``t`` on the device of ``module``'s parameters (its first one; nothing to check without
    any), named before the first operation mixes them and fails with torch's own words."""
    for p in module.parameters():
        check_same_device(t, name, p, f"the {type(module).__name__}")
        return


def check_dtype(t: Tensor, expected: Optional[torch.dtype], name: str = "x") -> None:
    """``t`` must have the module's parameter dtype ``expected`` (None: anything goes).

    Under ``torch.autocast`` for ``t``'s device, any dtype that autocast casts (float16, bfloat16,
    float32) is accepted with a module in one of them: autocast computes both in its own dtype.
    float64 is never cast by autocast, so it must match exactly.
    """
    if expected is None or t.dtype == expected:
        return
    low = (torch.float16, torch.bfloat16, torch.float32)
    if t.dtype in low and expected in low and autocast_enabled(t.device.type):
        return
    raise ValueError(f"{name} has dtype {t.dtype} but the module's parameters are {expected}: cast the input "
                     f"({name}.to({expected})) or the module (module.to({t.dtype})); under torch.autocast "
                     "float16 / bfloat16 / float32 inputs and modules mix, float64 does not")


def check_weights(x: Tensor, weights: Optional[Tensor]) -> None:
    if weights is None:
        return
    if not isinstance(weights, Tensor) or not weights.is_floating_point():
        got = weights.dtype if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a floating-point tensor of relevance logits, got {got}")
    if tuple(weights.shape) != tuple(x.shape[:2]):
        raise ValueError(f"weights must have shape (B, N) = {tuple(x.shape[:2])} to match x {_shape(x)}, "
                         f"got shape {_shape(weights)}")
    check_same_device(weights, "weights", x, "x")


def host_decisions(t: Tensor) -> bool:
    """Whether data-dependent choices may be taken on the host (with a synchronisation): on the
    CPU, outside ``torch.compile``'s tracing. There a synchronisation costs nothing and the host
    branch is the faster one; on CUDA it stalls the launch queue, and under tracing it breaks the
    graph, so there every choice is computed on the device or fixed in advance."""
    return t.device.type == "cpu" and not is_compiling()


def resolve_check_finite(check_finite: Optional[bool], x: Tensor) -> bool:
    """``check_finite=None`` (the modules' default) checks where that needs no host
    synchronisation worth avoiding (:func:`host_decisions`: the CPU, not under ``torch.compile``)
    and skips the check elsewhere; True / False force it on / off on every device."""
    if check_finite is None:
        return host_decisions(x)
    return bool(check_finite)


def check_check_finite(check_finite) -> Optional[bool]:
    if check_finite is not None and not isinstance(check_finite, bool):
        raise ValueError(f"check_finite must be True, False or None (check on the CPU only), got {check_finite!r}")
    return check_finite


def check_finite(x: Tensor, mask: Optional[Tensor], name: str = "x") -> None:
    """Raise if a *real* element of ``x`` (real floating point, ``(B, N, ...)``) holds NaN/Inf
    (padded elements may hold anything).

    Costs one reduction over ``x`` and one host synchronisation; turn off with ``check_finite=False``.
    """
    idx = first_non_finite(x, mask)
    if idx is not None:
        raise ValueError(f"{name} has a non-finite value at a real element, index {idx} of shape {_shape(x)} "
                         f"(mask it out, or pass check_finite=False to skip this check)")


def first_non_finite(x: Tensor, mask: Optional[Tensor]) -> Optional[Tuple[int, ...]]:
    """The index of the first NaN/Inf entry of a *real* element of ``x`` ``(B, N, ...)``, or None
    (one reduction and one host synchronisation; the index is searched only when there is one)."""
    if x.numel() == 0:
        return None
    # the largest magnitude per element (B, N), then over the real ones: max propagates NaN and |inf|
    # is inf, so this is exact, and on the CPU several times cheaper than isfinite + any on (B, N, D)
    with torch.no_grad():
        mag = x.abs()
        if mag.dim() > 2:
            mag = mag.flatten(2).amax(-1)
        if bool(torch.isfinite(zero_padding(mag, mask).amax())):
            return None
        bad = ~torch.isfinite(x)
        if mask is not None:
            bad = bad & mask.view(mask.shape + (1,) * (x.dim() - 2))
        return tuple(bad.nonzero()[0].tolist())


def zero_padding(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Replace padded elements by zeros with ``where`` (not a product), so -inf/NaN padding never
    reaches arithmetic and receives no gradient."""
    if mask is None:
        return x
    m = mask.view(mask.shape + (1,) * (x.dim() - 2))
    return torch.where(m, x, 0.0)


def assignment_mask(mask: Tensor) -> Tuple[Tensor, Tensor]:
    """The allowed (element i, position k) pairs of a padded batch, as two ``(B, N, N)`` parts.

    ``free``: real elements may go to the first ``n`` positions (n = number of real elements);
    ``pinned``: the j-th padded element (in input order) is fixed at position ``n + j``. In their
    union every row and column has at least one allowed entry, so the log-domain Sinkhorn never
    sees an all ``-inf`` line, and the real block is normalised exactly as the unpadded set would
    be. Apart, because a pinned entry is one-hot whatever its logit (the only entry of its row
    and of its column), so Sinkhorn need not read it.
    """
    B, N = mask.shape
    n = mask.sum(1, keepdim=True)                                   # (B, 1)
    pos = torch.arange(N, device=mask.device)
    real_pos = pos.unsqueeze(0) < n                                 # (B, N) positions used by real elements
    pad_target = n + torch.cumsum(~mask, dim=1) - 1                 # (B, N) each padded element's position
    free = mask.unsqueeze(2) & real_pos.unsqueeze(1)
    pinned = (~mask).unsqueeze(2) & (pos.view(1, 1, N) == pad_target.unsqueeze(2))
    return free, pinned


def pair_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """``(B, N, N)``: True where both elements are real."""
    if mask is None:
        return None
    return mask.unsqueeze(2) & mask.unsqueeze(1)
