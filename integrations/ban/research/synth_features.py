"""Box features of the synthetic VQA task: fixed random codes for class and colour, and their decoder.

A box of class c and colour k gets the feature (D = ``v_dim``)::

    v = relu(class_scale * code[c] + colour_scale * code[k] + bias + noise * eps),   eps ~ N(0, I_D)

with ``code[.]`` ~ N(0, I_D) drawn once from the dataset seed (each class / colour from its own
stream, so adding clutter classes does not change the other codes). Like pooled ReLU features of a
detector the features are non-negative; unlike them they carry nothing about the box's position or
size: the geometry is only in the spatial features. :meth:`FeatureCodes.decode` inverts the map
(nearest expected feature), which is what the oracle decoder uses.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import sqrt
from typing import Sequence

import numpy as np
from scipy.special import ndtr

from .synth_world import ASKED_CLASSES, COLOURS


@dataclass(frozen=True)
class FeatureConfig:
    """Feature size and the weights of the class code, colour code, bias and noise (see module docstring)."""

    v_dim: int = 32
    noise: float = 0.2
    class_scale: float = 2.0
    colour_scale: float = 1.0
    bias: float = 0.5

    def __post_init__(self):
        if self.v_dim < 1:
            raise ValueError(f"v_dim: need >= 1, got {self.v_dim}")
        if self.noise < 0:
            raise ValueError(f"noise: need >= 0, got {self.noise}")


class FeatureCodes:
    """The codes of one dataset: ``class_codes`` {name: (D,)}, ``colour_codes`` {name: (D,)}.

    Args:
        seed: the dataset seed.
        cfg: a :class:`FeatureConfig`.
        clutter: names of the clutter classes (asked classes are always ``ASKED_CLASSES``).
    """

    def __init__(self, seed: int, cfg: FeatureConfig, clutter: Sequence[str] = ()):
        self.cfg = cfg
        d = cfg.v_dim

        def code(*stream):
            return np.random.default_rng([seed, *stream]).normal(0, 1, d)

        self.class_codes = {c: code(1, i) for i, c in enumerate(ASKED_CLASSES)}
        self.class_codes.update({c: code(2, i) for i, c in enumerate(clutter)})
        self.colour_codes = {k: code(3, i) for i, k in enumerate(COLOURS)}

    def pre_activation(self, classes: Sequence[str], colours: Sequence[str]) -> np.ndarray:
        """Noise-free input of the ReLU, (n, D) float64."""
        c = self.cfg
        if len(classes) == 0:
            return np.zeros((0, c.v_dim))
        return (c.class_scale * np.stack([self.class_codes[x] for x in classes])
                + c.colour_scale * np.stack([self.colour_codes[k] for k in colours]) + c.bias)

    def encode(self, classes: Sequence[str], colours: Sequence[str], rng: np.random.Generator) -> np.ndarray:
        """(n, D) float32 features. A row is never all zero (that is how BAN recognises padding)."""
        m = self.pre_activation(classes, colours)
        f = np.maximum(m + self.cfg.noise * rng.normal(0, 1, m.shape), 0.0).astype(np.float32)
        dead = f.sum(1) == 0
        f[dead, 0] = np.float32(1e-3)  # astronomically rare for D >= 8; keeps padding detection exact
        return f

    def templates(self, classes: Sequence[str]) -> tuple:
        """Expected feature E[relu(m + noise eps)] of every (class, colour) pair of ``classes`` x COLOURS.

        Returns ``(means (P, D), pairs)`` with ``pairs[p] = (class, colour)``.
        """
        pairs = [(c, k) for c in classes for k in COLOURS]
        m = self.pre_activation([p[0] for p in pairs], [p[1] for p in pairs])
        s = self.cfg.noise
        if s == 0:
            return np.maximum(m, 0), pairs
        z = m / s
        # E[relu(X)] for X ~ N(m, s^2) = m Phi(m / s) + s phi(m / s)
        mean = m * ndtr(z) + s * np.exp(-0.5 * z ** 2) / sqrt(2 * np.pi)
        return mean, pairs

    def decode(self, features: np.ndarray, classes: Sequence[str]) -> tuple:
        """Class and colour of every row of ``features`` (n, D): the (class, colour) of ``classes`` x
        COLOURS whose expected feature is nearest (Euclidean). Returns two lists of names."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.cfg.v_dim:
            raise ValueError(f"features: expected (n, {self.cfg.v_dim}), got shape {features.shape}")
        means, pairs = self.templates(classes)
        d2 = (features ** 2).sum(1)[:, None] - 2 * features @ means.T + (means ** 2).sum(1)[None, :]
        best = d2.argmin(1)
        return [pairs[i][0] for i in best], [pairs[i][1] for i in best]
