"""Model registry: name -> (config class, model class). Each model file holds only its model.

Classifiers and segmenters are separate registries: they have different outputs and different callers.
"""

from dataclasses import asdict, fields

from torch import nn

from .cnn import CNN, CNNConfig
from .densenet import DenseNet, DenseNetConfig
from .mlp import MLP, MLPConfig
from .resnet import ResNet, ResNetConfig
from .segnet import SegNet, SegNetConfig
from .weight_init import initialise

CLASSIFIERS = {
    "mlp": (MLPConfig, MLP),
    "cnn": (CNNConfig, CNN),
    "resnet": (ResNetConfig, ResNet),
    "densenet": (DenseNetConfig, DenseNet),
}

SEGMENTERS = {
    "segnet": (SegNetConfig, SegNet),
}


def _config(registry: dict, kind: str, name: str, overrides: dict):
    """The config dataclass filled from the overrides it knows (None keeps its default), and the model class."""
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(registry)}")
    config_cls, model_cls = registry[name]
    known = {f.name for f in fields(config_cls)}
    return config_cls(**{k: v for k, v in overrides.items() if k in known and v is not None}), model_cls


def build_classifier(name: str, init: str = "default", **overrides) -> tuple[nn.Module, dict]:
    """Build a classifier from keyword overrides of its config; returns the model and the full config."""
    cfg, model_cls = _config(CLASSIFIERS, "model", name, overrides)
    cfg.in_shape = tuple(cfg.in_shape)
    model = initialise(model_cls(cfg), init)
    return model, asdict(cfg)


def build_segmenter(name: str, init: str = "default", **overrides) -> tuple[nn.Module, dict]:
    """Build a segmenter from keyword overrides of its config; returns the model and the full config."""
    cfg, model_cls = _config(SEGMENTERS, "segmenter", name, overrides)
    cfg.widths = tuple(cfg.widths)  # a list after a JSON round trip
    model = initialise(model_cls(cfg), init)
    return model, asdict(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
