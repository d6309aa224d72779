"""The element embedding every encoder shares.

MNIST elements: a tiny CNN is trained once on MNIST digit classification (train split only) and
frozen; its penultimate features, standardised, are computed once for every image and cached in
the run folder. Each model then puts its own trainable :class:`ElementMLP` on top, with the same
architecture and the same initial weights for every encoder of a seed, so the *set* part is what
differs between the models. Training the CNN end to end inside every (task, encoder, seed) cell would
make each step cost many times a whole step of the set models (the measured step times are in
``README.md``), and the suite would not fit its time budget.

Point elements (the position tasks) are ``[x, y, one-hot class]`` vectors fed to the same ElementMLP.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from integrations.common.atomic import atomic_torch_save
from integrations.common.seeding import seed_everything, seeded_generator
from integrations.common.datasets import load_split

FEATURES = 64          # width of the frozen CNN's penultimate layer


class TinyCNN(nn.Module):
    """Two 5x5 convolutions and two linear layers (47k parameters); ``features`` is the
    64-d penultimate activation. Shapes: ``(B, 1, 28, 28)`` float in [0, 1] -> logits ``(B, 10)``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5)
        self.conv2 = nn.Conv2d(16, 32, 5)
        self.fc = nn.Linear(32 * 4 * 4, FEATURES)
        self.out = nn.Linear(FEATURES, 10)

    def features(self, images: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.conv1(images)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, images: Tensor) -> Tensor:
        return self.out(self.features(images))


@dataclass
class MnistFeatures:
    """Frozen, standardised CNN features of every MNIST image and the digit labels.

    ``train``: (60000, 64) float32 (sets for training are drawn from these images);
    ``test``: (10000, 64) (validation sets from the even-numbered images, test sets from the odd ones);
    ``cnn_test_accuracy``: digit accuracy of the frozen CNN on the test split.
    """

    train: Tensor
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor
    cnn_test_accuracy: float
    pretrain_seconds: float

    def to_dict(self) -> dict:
        return dict(train=self.train, train_labels=self.train_labels, test=self.test, test_labels=self.test_labels,
                    cnn_test_accuracy=self.cnn_test_accuracy, pretrain_seconds=self.pretrain_seconds)


def _to_float(images: Tensor) -> Tensor:
    return images.to(torch.float32) / 255.0


@torch.no_grad()
def _features(cnn: TinyCNN, images: Tensor, chunk: int = 2000) -> Tensor:
    return torch.cat([cnn.features(_to_float(images[i:i + chunk])) for i in range(0, len(images), chunk)])


def pretrain_cnn(images: Tensor, labels: Tensor, epochs: int = 1, batch_size: int = 128, lr: float = 1e-3,
                 seed: int = 0) -> TinyCNN:
    """Digit classification, Adam, ``epochs`` passes over ``images`` (uint8 (N, 1, 28, 28))."""
    g = seeded_generator(seed)
    seed_everything(seed)
    cnn = TinyCNN()
    opt = torch.optim.Adam(cnn.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(cnn(_to_float(images[idx])), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return cnn.eval()


def mnist_features(data_root: Optional[os.PathLike], cache: Optional[Path] = None, epochs: int = 1,
                   seed: int = 0, train_images: Optional[int] = None) -> MnistFeatures:
    """Train the CNN (or load the cached result) and return the frozen features.

    ``cache``: a ``.pt`` file; written atomically after the first computation and read afterwards
    (the cells of a run, in any worker process, then share one embedding). ``train_images`` limits
    the CNN's training images (tests).
    """
    if cache is not None and Path(cache).is_file():
        return MnistFeatures(**torch.load(cache, weights_only=True))
    train = load_split("mnist", "train", data_root).take(train_images)
    test = load_split("mnist", "test", data_root)
    t0 = time.perf_counter()
    cnn = pretrain_cnn(train.images, train.labels, epochs=epochs, seed=seed)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = float((cnn(_to_float(test.images)).argmax(1) == test.labels).float().mean())
    # Standardise with the training images' statistics so the ElementMLP starts in a sane range.
    f_train, f_test = _features(cnn, train.images), _features(cnn, test.images)
    mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-3)
    out = MnistFeatures((f_train - mean) / std, train.labels.clone(), (f_test - mean) / std, test.labels.clone(),
                        acc, seconds)
    if cache is not None:
        state = out.to_dict()
        atomic_torch_save(cache, state)
    return out


class ElementMLP(nn.Module):
    """The trainable per-model element embedding: ``Linear(F, D) -> ReLU -> Linear(D, D)``.

    Shapes: ``(..., F) -> (..., D)``."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, dim), nn.ReLU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
