"""ResNet-18 (He et al. 2016) for the implicit-permutation task (paper section 4.3, appendix F.3).

Written here so that the integration does not need torchvision (which does not import beside every
CPU build of torch). Two stems:
``small_input=True`` (MNIST, CIFAR-10; 28-35 px) replaces the 7x7 stride-2 convolution and the max
pool by one 3x3 stride-1 convolution (the paper, F.3, replaces the convolution only, and the released
code keeps the max pool after it); ``small_input=False`` (64 px ImageNet stand-in) is the standard
stem. ``width`` is the channel count of the first stage (64 in ResNet-18); a smaller value keeps the
architecture (4 stages x 2 basic blocks) but cuts the CPU cost, used only for reduced-budget runs.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + self.shortcut(x))


class ResNet18(nn.Module):
    """forward(x (B, C, H, W)) -> logits (B, num_classes)."""

    def __init__(self, in_channels: int, num_classes: int, *, small_input: bool = True, width: int = 64):
        super().__init__()
        if small_input:
            stem = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        else:
            stem = [nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                    nn.MaxPool2d(3, 2, 1)]
        self.stem = nn.Sequential(*stem)
        layers, cin = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            cout = width * mult
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # any input size (28, 30, 33, 35, 64, 66 px)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x: expected (B, C, H, W), got shape {tuple(x.shape)}")
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))
