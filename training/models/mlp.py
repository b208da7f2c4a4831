"""Multi-layer perceptron: the lectures' fully connected classifier, from perceptron to deep MLP."""

from dataclasses import dataclass, field

import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}


@dataclass
class MLPConfig:
    in_shape: tuple[int, int, int] = (1, 28, 28)
    hidden: list[int] = field(default_factory=lambda: [512, 512])  # the lecture preset 784-512-512-10
    num_classes: int = 10
    activation: str = "tanh"
    dropout: float = 0.0


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        c, h, w = cfg.in_shape
        layers: list[nn.Module] = [nn.Flatten()]  # (C*H*W)
        width = c * h * w
        for size in cfg.hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[cfg.activation]()]  # size
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = size
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, cfg.num_classes)  # num_classes
        self.embedding_dim = width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
