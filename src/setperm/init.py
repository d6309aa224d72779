"""Creating parameters without a throw-away initialisation, and the paper's initialisation.

Paper appendix F: all weights are Xavier-initialised (Glorot & Bengio, 2010); the released code
uses zero biases. Submodules are created uninitialised (:func:`uninitialized`) so that a module's
``__init__`` draws exactly the random numbers of its ``reset_parameters()``: under the same seed,
``reset_parameters()`` then reproduces a freshly built module.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._compat import default_device


def uninitialized(module_cls, *args, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                  **kwargs) -> nn.Module:
    """``module_cls(*args, **kwargs)`` with uninitialised parameters on ``device`` / ``dtype``
    (defaults: torch's default device and dtype); the caller initialises them. Like
    ``torch.nn.utils.skip_init``, which treats ``device=None`` as the CPU."""
    target = torch.device(device) if device is not None else default_device()
    return module_cls(*args, device="meta", dtype=dtype, **kwargs).to_empty(device=target)


def xavier_linear_(layer: nn.Linear) -> None:
    """Xavier-uniform weight, zero bias (paper appendix F)."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def xavier_rnn_(rnn: nn.RNNBase) -> None:
    """Xavier-uniform init of each gate's block of an LSTM's or GRU's weights (the gates, four or
    three, are stacked along dim 0, so each block gets its own fan), zero biases (paper appendix F).
    An LSTM's projection ``weight_hr`` (``proj_size``) stacks no gates: one block."""
    gates = rnn.weight_ih_l0.shape[0] // rnn.hidden_size
    for name, p in rnn.named_parameters():
        if name.startswith("weight_hr"):
            nn.init.xavier_uniform_(p.data)
        elif "weight" in name:
            for chunk in p.data.chunk(gates, dim=0):
                nn.init.xavier_uniform_(chunk)
        else:
            nn.init.zeros_(p)
