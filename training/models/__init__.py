"""Model registry: name -> (config class, model class). Each model file holds only its model."""

from dataclasses import asdict, fields

from torch import nn

from .cnn import CNN, CNNConfig
from .init import initialise
from .mlp import MLP, MLPConfig
from .resnet import ResNet, ResNetConfig

CLASSIFIERS = {
    "mlp": (MLPConfig, MLP),
    "cnn": (CNNConfig, CNN),
    "resnet": (ResNetConfig, ResNet),
}


def build_classifier(name: str, init: str = "default", **overrides) -> tuple[nn.Module, dict]:
    """Build a classifier from keyword overrides of its config; returns the model and the full config."""
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(CLASSIFIERS)}")
    config_cls, model_cls = CLASSIFIERS[name]
    known = {f.name for f in fields(config_cls)}
    cfg = config_cls(**{k: v for k, v in overrides.items() if k in known and v is not None})
    cfg.in_shape = tuple(cfg.in_shape)
    model = initialise(model_cls(cfg), init)
    return model, asdict(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
