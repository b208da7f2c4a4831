"""Weight initialisation by the lecture formulas, written out so the variance each one targets is visible.

Xavier/Glorot (2010) keeps activation and gradient variance equal across a layer:
    Var(W) = 2 / (fan_in + fan_out)   -> uniform bound sqrt(6 / (fan_in + fan_out)) or normal std sqrt(2 / (fan_in + fan_out))
Kaiming/He (2015) compensates for ReLU zeroing half of its inputs:
    Var(W) = 2 / fan_in               -> normal std sqrt(2 / fan_in)
Biases start at zero; batch-norm scales at one.
"""

import math

import torch
from torch import nn

SCHEMES = ("default", "xavier-uniform", "xavier-normal", "kaiming-normal")


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """fan_in and fan_out of a Linear [out, in] or Conv [out, in, kh, kw] weight."""
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * receptive, weight.shape[0] * receptive


@torch.no_grad()
def init_weight(weight: torch.Tensor, scheme: str, generator: torch.Generator | None = None) -> None:
    fan_in, fan_out = fans(weight)
    if scheme == "xavier-uniform":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        weight.uniform_(-bound, bound, generator=generator)
    elif scheme == "xavier-normal":
        weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
    elif scheme == "kaiming-normal":
        weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
    else:
        raise ValueError(f"unknown init scheme {scheme!r}; choose one of {SCHEMES}")


def initialise(model: nn.Module, scheme: str) -> nn.Module:
    """Apply `scheme` to every Linear and Conv layer; "default" keeps PyTorch's own initialisation."""
    if scheme == "default":
        return model
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            init_weight(module.weight, scheme)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model
