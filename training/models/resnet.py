"""CIFAR-style residual network (He et al. 2016, section 4.2): depth 6n+2, basic blocks, batch norm.

Three stages of n blocks at widths 16w, 32w, 64w; the spatial size halves at stages 2 and 3
(28 -> 14 -> 7 for Fashion-MNIST). Projection shortcuts (1x1 conv + BN) where the shape changes.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ResNetConfig:
    in_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    depth: int = 20          # 6n+2: 20, 32, 44, 56, 110
    width: float = 1.0       # multiplies the 16/32/64 channels of each stage


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig):
        super().__init__()
        if (cfg.depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2, got {cfg.depth}")
        n = (cfg.depth - 2) // 6
        widths = [int(round(16 * cfg.width)), int(round(32 * cfg.width)), int(round(64 * cfg.width))]
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_shape[0], widths[0], 3, padding=1, bias=False),  # 16w x H x W
            nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
        )
        blocks, in_ch = [], widths[0]
        for stage, out_ch in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)  # 16w x H x W -> 32w x H/2 x W/2 -> 64w x H/4 x W/4
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # 64w
        self.classifier = nn.Linear(in_ch, cfg.num_classes)
        self.embedding_dim = in_ch

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
