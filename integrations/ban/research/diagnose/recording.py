"""Forward hooks that read the intermediate tensors of a BAN forward without changing the model code: the
relevance logits the set encoder receives and the permutation P its permutation optimiser produces."""
from __future__ import annotations

from typing import Optional

from torch import Tensor


class RelevanceRecorder:
    """Forward hook on the set encoder: keeps the relevance logits (``weights``) of its last call."""

    def __init__(self, model):
        encoder = getattr(model, "set_encoder", None)
        self.weights: Optional[Tensor] = None
        self._handle = (encoder.register_forward_hook(self._record, with_kwargs=True)
                        if encoder is not None else None)

    def _record(self, module, args, kwargs, output) -> None:
        w = kwargs.get("weights", args[3] if len(args) > 3 else None)
        self.weights = None if w is None else w.detach()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()


class PermutationRecorder:
    """Forward hook on the set encoder's permutation module (PO): keeps the last P it produced."""

    def __init__(self, model):
        encoder = getattr(model, "set_encoder", None)
        self.module = getattr(encoder, "po", None)
        self.P: Optional[Tensor] = None
        self._handle = self.module.register_forward_hook(self._record) if self.module is not None else None

    def _record(self, module, args, output) -> None:
        self.P = (output[-1] if isinstance(output, list) else output).detach()

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
