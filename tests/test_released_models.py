"""The released classifiers in models/: contract, checksum, size and the accuracy gates, re-measured here."""

import hashlib
import json
from pathlib import Path

import pytest

from export.evaluate import ACCURACY_GATES, evaluate_classifier

MODELS = Path(__file__).resolve().parent.parent / "models"


def released_classifiers() -> list[str]:
    return sorted(p.parent.name for p in MODELS.glob("*/card.json")
                  if json.loads(p.read_text()).get("task") == "classification")


def test_every_released_classifier_has_a_gate():
    released = released_classifiers()
    assert {"mlp", "cnn", "resnet"} <= set(released)  # the ones released so far; a model may be added, never lost
    assert set(released) <= set(ACCURACY_GATES), "a released classifier without a release gate"


@pytest.mark.parametrize("name", released_classifiers())
def test_released_classifier_meets_its_gate(name):
    model_dir = MODELS / name
    card = json.loads((model_dir / "card.json").read_text())
    assert hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest() == card["sha256"]
    assert card["input"]["shape"] == ["N", 1, 28, 28] and card["labels"][0] == "T-shirt/top"
    assert (model_dir / "confusion.png").is_file() and (model_dir / "curves.png").is_file()
    result = evaluate_classifier(model_dir)  # onnxruntime over all 10,000 Fashion-MNIST test images
    assert result["images"] == 10_000
    assert result["problems"] == []
    assert result["accuracy"] >= ACCURACY_GATES[name]


def released_generators() -> list[str]:
    return sorted(p.parent.name for p in MODELS.glob("*/card.json")
                  if json.loads(p.read_text()).get("task") == "generation")


@pytest.mark.parametrize("name", released_generators())
def test_released_generator_meets_its_gates(name):
    """The independent check: 1,000 samples of every class, judged by the released ResNet (its checksum
    verified), at least 90% in the class asked for, and feature FID within 3x the real-data floor."""
    from export.evaluate_generator import CONSISTENCY_GATE, FID_RATIO_GATE, evaluate_generator

    model_dir = MODELS / name
    card = json.loads((model_dir / "card.json").read_text())
    assert (model_dir / "samples.png").is_file() and (model_dir / "curves.png").is_file()
    assert card["metrics"]["judge"]["name"] == "resnet"
    result = evaluate_generator(model_dir, MODELS / "resnet")
    assert result["judge"]["sha256"] == card["metrics"]["judge"]["sha256"]  # judged by the released ResNet
    assert result["samples"] == 10_000 and set(result["per_class_consistency"]) == set(card["labels"])
    assert result["class_consistency"] >= CONSISTENCY_GATE
    assert result["fid_to_floor_ratio"] <= FID_RATIO_GATE
    assert result["class_consistency"] == pytest.approx(card["metrics"]["class_consistency"], abs=1e-6)
