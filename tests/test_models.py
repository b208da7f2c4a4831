"""One parametrised test over every architecture (timm's test_models style)."""

import math

import pytest
import torch

from training.models import CLASSIFIERS, build_classifier, count_parameters
from training.models.weight_init import init_weight

ARCHITECTURES = [
    ("mlp", dict(activation="tanh")),
    ("mlp", dict(activation="relu", dropout=0.2)),
    ("mlp", dict(activation="sigmoid", hidden=[64])),
    ("cnn", {}),
    ("resnet", dict(depth=8, width=0.5)),
    ("resnet", dict(depth=20)),
    ("densenet", dict(depth=10, growth_rate=4)),
    ("densenet", dict(depth=40, growth_rate=12)),
]


@pytest.mark.parametrize("name,overrides", ARCHITECTURES, ids=lambda v: str(v))
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 32, 32)])
def test_forward_backward(name, overrides, in_shape):
    torch.manual_seed(0)
    model, config = build_classifier(name, init="kaiming-normal", in_shape=in_shape, num_classes=7, **overrides)
    x = torch.randn(4, *in_shape)
    logits = model(x)
    assert logits.shape == (4, 7)
    assert model.forward_features(x).shape == (4, model.embedding_dim)
    assert torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a gradient: {missing}"
    assert tuple(config["in_shape"]) == in_shape


def test_every_registered_model_is_covered():
    assert {name for name, _ in ARCHITECTURES} == set(CLASSIFIERS)


@pytest.mark.parametrize("name,overrides,expected", [
    ("mlp", dict(hidden=[512, 512]), 669_706),  # the lectures' 784-512-512-10
    ("cnn", {}, 600_810),                       # conv32-conv32-pool-fc128-fc10 on 28x28
    ("resnet", dict(depth=20), 272_186),        # He et al.'s ResNet-20 with projection shortcuts, 1 channel in
    ("densenet", dict(depth=40), 175_690),      # DenseNet-BC L=40, k=12: the released recipe
    ("densenet", dict(depth=100), 768_730),     # DenseNet-BC L=100, k=12: the 768K anchor, 1 channel in
])
def test_lecture_parameter_counts(name, overrides, expected):
    model, _ = build_classifier(name, **overrides)
    assert count_parameters(model) == expected


def test_densenet_structure_and_parameter_cap():
    """Dense blocks of n = (L-4)/6 bottleneck layers, each adding k channels; transitions keep half of them."""
    model, _ = build_classifier("densenet", depth=40, growth_rate=12)
    assert count_parameters(model) < 1_000_000  # issue 26: under 1M parameters
    # 2k = 24 in, +6 x 12 = 96 -> 48, +72 = 120 -> 60, +72 = 132 channels at 7x7
    assert model.embedding_dim == 132
    x = torch.randn(2, 1, 28, 28)
    assert model.blocks(model.stem(x)).shape == (2, 132, 7, 7)
    with pytest.raises(ValueError, match="6n\\+4"):
        build_classifier("densenet", depth=41)


def test_resnet_rejects_bad_depth():
    with pytest.raises(ValueError, match="6n\\+2"):
        build_classifier("resnet", depth=21)


@pytest.mark.parametrize("scheme,expected_std", [
    ("xavier-uniform", lambda fi, fo: math.sqrt(2 / (fi + fo))),
    ("xavier-normal", lambda fi, fo: math.sqrt(2 / (fi + fo))),
    ("kaiming-normal", lambda fi, fo: math.sqrt(2 / fi)),
])
def test_init_formulas(scheme, expected_std):
    weight = torch.empty(256, 128, 3, 3)  # fan_in 1152, fan_out 2304
    init_weight(weight, scheme, generator=torch.Generator().manual_seed(0))
    assert weight.std().item() == pytest.approx(expected_std(128 * 9, 256 * 9), rel=0.02)
    assert abs(weight.mean().item()) < 1e-3
    if scheme == "xavier-uniform":
        assert weight.abs().max().item() <= math.sqrt(6 / (128 * 9 + 256 * 9))


def test_init_applies_to_every_layer():
    model, _ = build_classifier("cnn", init="xavier-normal")
    assert all(m.bias.abs().sum() == 0 for m in model.modules() if isinstance(m, torch.nn.Linear))
