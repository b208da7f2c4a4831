"""The lectures' convolutional autoencoder: two strided convolutions down to a small code, two transposed ones back.

The code (the bottleneck) is a `code_dim` vector: with 28x28 garments a 32-number code keeps the outline and
the main shading, and the reconstruction error of an image unlike the training set is large, which is what
makes the error an out-of-distribution score. Inputs are normalised to [0, 1]; the decoder ends in a sigmoid,
so a reconstruction is in the same range.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class AutoencoderConfig:
    in_shape: tuple[int, int, int] = (1, 28, 28)
    channels: int = 32       # the first convolution's width; the second has twice as many
    code_dim: int = 32       # the bottleneck


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        c, h, w = cfg.in_shape
        if h % 4 or w % 4:
            raise ValueError(f"height and width must be multiples of 4, got {h}x{w}")
        k = cfg.channels
        self.feature_shape = (2 * k, h // 4, w // 4)
        flat = 2 * k * (h // 4) * (w // 4)
        self.encoder = nn.Sequential(
            nn.Conv2d(c, k, 3, stride=2, padding=1), nn.BatchNorm2d(k), nn.ReLU(inplace=True),          # k x H/2 x W/2
            nn.Conv2d(k, 2 * k, 3, stride=2, padding=1), nn.BatchNorm2d(2 * k), nn.ReLU(inplace=True),  # 2k x H/4 x W/4
            nn.Flatten(),
            nn.Linear(flat, cfg.code_dim),                                                               # code_dim
        )
        self.decoder_input = nn.Sequential(nn.Linear(cfg.code_dim, flat), nn.ReLU(inplace=True))        # 2k x H/4 x W/4
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(2 * k, k, 4, stride=2, padding=1), nn.BatchNorm2d(k), nn.ReLU(inplace=True),  # k x H/2 x W/2
            nn.ConvTranspose2d(k, c, 4, stride=2, padding=1),                                                # C x H x W
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x in [0, 1], [N, C, H, W] -> code [N, code_dim]."""
        return self.encoder(x)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.decoder_input(code).view(-1, *self.feature_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))
