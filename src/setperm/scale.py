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
    amax = x.detach().abs().flatten(1).amax(1) if x.shape[1] * x.shape[2] else x.new_zeros(x.shape[0])
    # exponents in float32, or float64 for a float64 set: float64 magnitudes beyond float32's range
    # would become inf there (frexp(inf) gives exponent 0, hence no scaling at all). s <= amax, so
    # s fits x's dtype.
    work = torch.promote_types(amax.dtype, torch.float32)
    exponent = torch.frexp(amax.to(work)).exponent                      # amax = m * 2^e, m in [0.5, 1)
    # (the exponent in the working dtype: older torch, 2.4 among them, computes 2 ** an integer exponent
    # in float32, which overflows past 2 ** 127)
    return torch.ldexp(torch.ones_like(amax, dtype=work), (exponent - 1).clamp_min(0).to(work)).to(x.dtype)
