"""The lectures' MNIST convnet: two 3x3 convolutions, max pooling, dropout, two dense layers."""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CNNConfig:
    in_shape: tuple[int, int, int] = (1, 28, 28)
    num_classes: int = 10
    channels: int = 32
    fc_width: int = 128
    dropout_conv: float = 0.25
    dropout_fc: float = 0.5


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        c, h, w = cfg.in_shape
        k = cfg.channels
        self.features = nn.Sequential(
            nn.Conv2d(c, k, 3), nn.ReLU(inplace=True),  # k x (H-2) x (W-2)
            nn.Conv2d(k, k, 3), nn.ReLU(inplace=True),  # k x (H-4) x (W-4)
            nn.MaxPool2d(2),                            # k x (H-4)/2 x (W-4)/2  (32 x 12 x 12 for 28x28)
            nn.Dropout(cfg.dropout_conv),
            nn.Flatten(),
            nn.Linear(k * ((h - 4) // 2) * ((w - 4) // 2), cfg.fc_width), nn.ReLU(inplace=True),  # fc_width
            nn.Dropout(cfg.dropout_fc),
        )
        self.classifier = nn.Linear(cfg.fc_width, cfg.num_classes)  # num_classes
        self.embedding_dim = cfg.fc_width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
