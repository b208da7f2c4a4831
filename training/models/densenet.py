"""DenseNet-BC (Huang et al. 2017, CIFAR variant): three dense blocks, bottleneck layers, compressed transitions.

Each layer of a dense block sees the concatenation of every earlier feature map in its block and adds k
(the growth rate) new channels: BN-ReLU-1x1 conv to 4k channels (the bottleneck, "B"), then BN-ReLU-3x3
conv to k. Between blocks a transition (BN-ReLU-1x1 conv, 2x2 average pooling) halves the spatial size and
keeps half of the channels (compression 0.5, "C"). Depth L counts the convolutions: one stem conv, two per
bottleneck layer in three blocks, two transitions and the classifier, so each block has n = (L - 4) / 6
layers (L = 100 and k = 12 is the paper's 0.8M-parameter DenseNet-BC). Spatial sizes for Fashion-MNIST:
28 -> 14 -> 7.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DenseNetConfig:
    in_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    depth: int = 100         # 6n+4 convolutions: 40, 52, 64, 76, 100, 190, 250
    growth_rate: int = 12    # k: channels each layer adds
    compression: float = 0.5  # share of channels a transition keeps
    bottleneck: int = 4      # the 1x1 bottleneck outputs bottleneck * k channels (the paper's 4k)


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (4k) - BN-ReLU-3x3 conv (k); its k channels are concatenated to its input."""

    def __init__(self, in_ch: int, growth_rate: int, bottleneck: int):
        super().__init__()
        inner = bottleneck * growth_rate
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, inner, 1, bias=False)                      # 4k x H x W
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, growth_rate, 3, padding=1, bias=False)   # k x H x W
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return torch.cat([x, out], dim=1)  # (in_ch + k) x H x W


class Transition(nn.Module):
    """BN-ReLU-1x1 conv to compression x channels, then 2x2 average pooling."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)  # out_ch x H x W
        self.pool = nn.AvgPool2d(2)                          # out_ch x H/2 x W/2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    def __init__(self, cfg: DenseNetConfig):
        super().__init__()
        if (cfg.depth - 4) % 6 != 0 or cfg.depth < 10:
            raise ValueError(f"DenseNet-BC depth must be 6n+4 with n >= 1, got {cfg.depth}")
        n = (cfg.depth - 4) // 6
        k = cfg.growth_rate
        channels = 2 * k  # the paper's stem width for DenseNet-BC
        self.stem = nn.Conv2d(cfg.in_shape[0], channels, 3, padding=1, bias=False)  # 2k x H x W
        stages = []
        for block in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(channels, k, cfg.bottleneck))
                channels += k
            stages.append(nn.Sequential(*layers))  # (c + n k) x H x W, at H = 28, 14, 7 for Fashion-MNIST
            if block < 2:
                out_ch = int(channels * cfg.compression)
                stages.append(Transition(channels, out_ch))  # c/2 x H/2 x W/2
                channels = out_ch
        self.blocks = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())  # channels
        self.classifier = nn.Linear(channels, cfg.num_classes)
        self.embedding_dim = channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
