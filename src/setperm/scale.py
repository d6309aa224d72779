"""Power-of-two scaling of sets, so that huge (finite) elements do not overflow inside a layer.

Dividing by a power of two is exact for normal floats: computing a positively homogeneous map on
``x / s`` and multiplying back by ``s`` (or letting a normalisation remove ``s``) gives bitwise
the same result whenever nothing overflows, and a finite one (or ``+-inf``, never NaN from
``inf - inf``) when the unscaled computation would overflow.
"""
from __future__ import annotations

import torch
from torch import Tensor


def set_scale(x: Tensor) -> Tensor:
    """``(B,)`` power of two ``s >= 1`` per set with ``max |x_b| / s < 2``, for ``x`` ``(B, N, D)``
    (padded elements zeroed, so that they do not set the scale). ``s = 1`` for every set with
    ``max |x| < 2``; a power of two changes no rounding of normal floats.

    Used by the ordering cost: ``f`` (ReLU layers with biases, no bias on the last) is positively
    homogeneous in (inputs, biases), ``f(x / s; b / s) = f(x; b) / s``, so evaluating it on
    ``x / s`` with biases ``b / s`` gives ``C / s`` and eq. 10 removes ``s`` (paper eq. 8-10); and by
    the linear-assignment logits, ``s * ((x / s) W^T)`` (eq. 6), with each element as a set of one.
    """
    if x.shape[1] * x.shape[2]:
        amax = torch.linalg.vector_norm(x.detach(), ord=float("inf"), dim=(1, 2))    # max |x_b|: one reduction
    else:
        amax = x.new_zeros(x.shape[0])
    # The exponent read from the bits of max |x| in float32, or float64 for a float64 set (float64
    # magnitudes beyond float32's range would become inf there): max |x| = 1.f * 2^(E - bias) with the
    # biased exponent E, so s = 2^max(E - bias, 0), whose bits are max(E, bias) shifted into place. A
    # zero or subnormal maximum (E = 0) gives s = 1; so does a non-finite one (E all ones), as if
    # unscaled. Six operations on the device (frexp and ldexp would take eight).
    if amax.dtype == torch.float64:
        as_int, mantissa, bias, ones = torch.int64, 52, 1023, 2047
    else:
        amax = amax.float()
        as_int, mantissa, bias, ones = torch.int32, 23, 127, 255
    exponent = amax.view(as_int) >> mantissa                             # E (max |x| >= 0: no sign bit)
    exponent = torch.where(exponent < ones, exponent.clamp_min(bias), bias)
    return (exponent << mantissa).view(amax.dtype).to(x.dtype)          # s <= max |x|: fits x's dtype
