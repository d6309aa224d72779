"""A set model: the shared element embedding, one encoder of the zoo, and a small head."""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from integrations.common.seeding import seed_everything

from .embedding import ElementMLP
from .encoders import EncoderConfig, SetpermReadout, build_encoder, count_parameters

HEAD_HIDDEN = 64


class SetModel(nn.Module):
    """``ElementMLP(F, D)`` per element -> encoder -> ``Linear(W, 64)``-ReLU-``Linear(64, out)``.

    Shapes: ``forward(elements (B, N, F), mask (B, N)) -> (B, out)``; with ``return_permutation``
    also the encoder's soft permutation ``P (B, N, N)`` (None for the PyG baselines)."""

    def __init__(self, element: nn.Module, encoder: nn.Module, width: int, out_features: int):
        super().__init__()
        self.element, self.encoder = element, encoder
        self.head = nn.Sequential(nn.Linear(width, HEAD_HIDDEN), nn.ReLU(), nn.Linear(HEAD_HIDDEN, out_features))

    def forward(self, elements: Tensor, mask: Tensor, return_permutation: bool = False):
        h = self.element(elements)
        P: Optional[Tensor] = None
        if isinstance(self.encoder, SetpermReadout) and return_permutation:
            z, P = self.encoder(h, mask, return_permutation=True)
        else:
            z = self.encoder(h, mask)
        out = self.head(z)
        return (out, P) if return_permutation else out


def build_model(encoder: str, in_features: int, dim: int, width: int, out_features: int, cfg: EncoderConfig,
                seed: Optional[int] = None) -> SetModel:
    """With ``seed``, the element MLP is initialised from it first, so every encoder of a seed starts
    from the same element embedding."""
    if seed is not None:
        seed_everything(seed)
    element = ElementMLP(in_features, dim)
    return SetModel(element, build_encoder(encoder, dim, width, cfg), width, out_features)


def model_size(encoder: str, in_features: int, dim: int, width: int, out_features: int,
               cfg: EncoderConfig) -> Tuple[int, int]:
    """(whole model, encoder alone) trainable parameter counts."""
    m = build_model(encoder, in_features, dim, width, out_features, cfg)
    return count_parameters(m), count_parameters(m.encoder)
