"""SegNet (Badrinarayanan, Kendall and Cipolla 2017): an encoder-decoder that upsamples with pooling indices.

Each encoder stage is conv-BN-ReLU blocks ending in a 2x2 max-pool that also returns *where* each maximum
was; the mirrored decoder stage puts its input back at exactly those positions with max-unpooling (zeros
elsewhere) and densifies the sparse map with conv-BN-ReLU blocks. Carrying the indices instead of whole
feature maps (U-Net) is what keeps boundaries sharp at the cost of a few bytes per pooled value. No fully
connected layer anywhere, so any H and W that are multiples of `stride` work; a final 1x1 convolution gives
per-pixel class scores, turned into probabilities by the softmax in the loss and in the exported graph.
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SegNetConfig:
    in_channels: int = 1
    num_classes: int = 11                       # background + the 10 Fashion-MNIST classes
    widths: tuple[int, ...] = (32, 64, 128)     # channels of each encoder stage; one 2x2 pool per stage
    convs_per_stage: int = 2                    # conv-BN-ReLU blocks per encoder (and decoder) stage


def conv_bn_relu(in_ch: int, out_ch: int) -> nn.Sequential:
    # No conv bias: the batch norm right after it has its own shift.
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False), nn.BatchNorm2d(out_ch),
                         nn.ReLU(inplace=True))


class EncoderStage(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, convs: int):
        super().__init__()
        self.convs = nn.Sequential(*[conv_bn_relu(in_ch if i == 0 else out_ch, out_ch) for i in range(convs)])
        self.pool = nn.MaxPool2d(2, stride=2, return_indices=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool(self.convs(x))  # out_ch x H/2 x W/2, and the argmax of each 2x2 window


class DecoderStage(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, convs: int):
        super().__init__()
        self.unpool = nn.MaxUnpool2d(2, stride=2)
        self.convs = nn.Sequential(*[conv_bn_relu(in_ch, in_ch if i < convs - 1 else out_ch) for i in range(convs)])

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.convs(self.unpool(x, indices))  # in_ch x 2H x 2W (sparse) -> out_ch x 2H x 2W


class SegNet(nn.Module):
    def __init__(self, cfg: SegNetConfig):
        super().__init__()
        if cfg.convs_per_stage < 1 or not cfg.widths:
            raise ValueError("SegNet needs at least one stage and one convolution per stage")
        widths = list(cfg.widths)
        # Input height and width must be multiples of `stride` (one halving per stage) so that every pooled
        # map unpools back to its exact size; callers pad to a multiple of it and crop the mask back.
        self.stride = 2 ** len(widths)
        ins = [cfg.in_channels] + widths[:-1]
        # widths (32, 64, 128) on 64x64: 1x64x64 -> 32x32x32 -> 64x16x16 -> 128x8x8
        self.encoder = nn.ModuleList(EncoderStage(i, o, cfg.convs_per_stage) for i, o in zip(ins, widths))
        # Mirror image, deepest first: 128x8x8 -> 64x16x16 -> 32x32x32 -> 32x64x64
        outs = [widths[0]] + widths[:-1]
        self.decoder = nn.ModuleList(DecoderStage(i, o, cfg.convs_per_stage)
                                     for i, o in reversed(list(zip(widths, outs))))
        self.classifier = nn.Conv2d(widths[0], cfg.num_classes, 1)  # num_classes x H x W, per-pixel scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_switches(x)[0]

    def forward_with_switches(self, x: torch.Tensor, switches: list[torch.Tensor] | None = None
                              ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Scores, each stage's pooling switches and each stage's pooling input. With `switches` given, the
        encoder takes its maxima at those positions instead of its own: replaying another runtime's choices
        (export parity) shows whether two runs differ only where a pooling window was nearly tied."""
        used, pooled_from = [], []
        for i, stage in enumerate(self.encoder):
            features = stage.convs(x)
            if switches is None:
                x, where = stage.pool(features)
            else:
                where = switches[i]
                x = features.flatten(2).gather(2, where.flatten(2)).view(where.shape)
            used.append(where)
            pooled_from.append(features)
        for stage, where in zip(self.decoder, reversed(used)):
            x = stage(x, where)
        return self.classifier(x), used, pooled_from
