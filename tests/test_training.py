"""The training CLI end to end on scikit-learn's digits: outputs, determinism, resume."""

import json

import pytest
import torch

from training.common import augment_batch, uses_channels_last
from training.train_classifier import AUGMENTATIONS, PRESETS, command_for, main, parse_args, resolve_config


def train(tmp_path, *flags):
    return main(parse_args(["--dataset", "digits", "--out", str(tmp_path), "--no-progress", *flags]))


@pytest.mark.parametrize("model", ["mlp", "cnn", "resnet"])
def test_dry_run_writes_a_complete_run(tmp_path, model):
    run = train(tmp_path, "--model", model, "--epochs", "2", "--dry-run", "--depth", "8")
    for name in ("config.json", "metrics.json", "best.pt", "last.pt", "curves.png", "confusion.png"):
        assert (run / name).stat().st_size > 0, name
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["model"] == model and config["config"]["seed"] == 0
    assert config["data_files"] and config["hardware"] and config["parameters"] > 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["wall_seconds"] > 0 and 0 <= metrics["test_acc_torch"] <= 1
    best = torch.load(run / "best.pt", weights_only=False)
    assert best["config"]["model"] == model and best["epoch"] == metrics["best_epoch"]


def test_digits_actually_learn(tmp_path):
    run = train(tmp_path, "--model", "mlp", "--activation", "relu", "--epochs", "8", "--lr", "3e-3")
    assert json.loads((run / "metrics.json").read_text())["test_acc_torch"] > 0.85


def test_same_seed_same_metrics(tmp_path):
    flags = ["--model", "cnn", "--epochs", "2", "--augment", "shift-flip-erase", "--seed", "7"]
    a = json.loads((train(tmp_path / "a", *flags) / "metrics.json").read_text())
    b = json.loads((train(tmp_path / "b", *flags) / "metrics.json").read_text())
    assert a["history"] == b["history"]
    assert a["test_acc_torch"] == b["test_acc_torch"]
    c = json.loads((train(tmp_path / "c", *flags[:-1], "8") / "metrics.json").read_text())
    assert c["history"] != a["history"]


def test_resume_continues_an_interrupted_run(tmp_path):
    flags = ["--model", "mlp", "--schedule", "cosine", "--augment", "shift", "--dropout", "0.1", "--seed", "3",
             "--epochs", "3"]
    full = json.loads((train(tmp_path / "full", *flags) / "metrics.json").read_text())
    stopped = train(tmp_path / "part", *flags, "--stop-after", "2")
    assert not (stopped / "metrics.json").exists()
    assert torch.load(stopped / "last.pt", weights_only=False)["epoch"] == 2
    # The first two epochs ran "elsewhere": a resumed run keeps where each stretch of epochs ran.
    record = json.loads((stopped / "config.json").read_text())
    assert record["sessions"] == [{"first_epoch": 1, "hardware": record["hardware"],
                                   "bf16_autocast": record["bf16_autocast"], "channels_last": record["channels_last"]}]
    (stopped / "config.json").write_text(json.dumps(record | {"hardware": "CPU elsewhere", "sessions": None}))
    resumed = main(parse_args(["--resume", str(stopped), "--no-progress"]))
    assert resumed == stopped
    sessions = json.loads((resumed / "config.json").read_text())["sessions"]
    assert [(s["first_epoch"], s["hardware"]) for s in sessions] == [(1, "CPU elsewhere"), (3, record["hardware"])]
    metrics = json.loads((resumed / "metrics.json").read_text())
    # Per-epoch seeding and the saved optimiser/scheduler state make the resumed epoch the same epoch.
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    for got, want in zip(metrics["history"], full["history"]):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    assert metrics["test_acc_torch"] == full["test_acc_torch"]


@pytest.mark.parametrize("kind", AUGMENTATIONS)
def test_augment_keeps_shape_and_dtype(kind):
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    out = augment_batch(images, kind, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, images) == (kind == "none")


def test_shift_moves_content_without_scaling():
    image = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    image[0, 0, 10:14, 10:14] = 200
    out = augment_batch(image.repeat(64, 1, 1, 1), "shift", torch.Generator().manual_seed(0))
    assert (out.flatten(1).sum(1) == image.sum()).all()  # a 2-pixel shift never cuts off a centred patch


def test_presets_resolve_and_flags_override():
    config = resolve_config(parse_args(["--preset", "seed-mlp", "--epochs", "3"]))
    assert config["optimizer"] == "sgd" and config["lr"] == 0.1 and config["epochs"] == 3
    assert command_for(config) == "python -m training.train_classifier --preset seed-mlp --epochs 3 --seed 0"
    assert set(PRESETS) >= {"seed-mlp", "seed-mlp-relu", "seed-cnn", "release-mlp", "release-cnn", "release-resnet"}


def test_channels_last_is_recorded_and_off_for_the_mlp(tmp_path):
    cnn = json.loads((train(tmp_path / "cnn", "--model", "cnn", "--epochs", "1", "--dry-run") / "config.json").read_text())
    assert cnn["channels_last"] is True and cnn["config"]["channels_last"] == "on"
    off = json.loads((train(tmp_path / "off", "--model", "cnn", "--epochs", "1", "--dry-run", "--channels-last", "off")
                      / "config.json").read_text())
    assert off["channels_last"] is False
    assert "--channels-last off" in command_for(off["config"])
    mlp = json.loads((train(tmp_path / "mlp", "--model", "mlp", "--epochs", "1", "--dry-run") / "config.json").read_text())
    assert mlp["channels_last"] is False


def test_runs_recorded_before_the_option_resume_with_their_old_memory_format():
    legacy = {"model": "resnet"}  # no channels_last key: NHWC came with bf16 autocast only
    assert uses_channels_last(legacy, use_bf16=False) is False
    assert uses_channels_last(legacy, use_bf16=True) is True
    assert uses_channels_last({"model": "resnet", "channels_last": "on"}, use_bf16=False) is True


def test_distillation_loss_is_zero_only_when_the_student_matches_the_teacher():
    from training.train_classifier import distillation_loss

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    teacher = torch.log_softmax(logits, dim=1)
    assert distillation_loss(logits, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits.flip(1), teacher, 4.0).item() > 0.01


def test_a_distilled_run_learns_from_its_teacher_and_records_it(tmp_path):
    """--distill-from: the teachers' soft targets replace most of the label loss, the run records which teacher
    files (SHA-256) taught it, and a resumed distilled run continues exactly."""
    from training.data import sha256_file

    teacher = train(tmp_path / "teacher", "--model", "mlp", "--activation", "relu", "--epochs", "6", "--lr", "3e-3")
    best = str(teacher / "best.pt")
    flags = ["--model", "mlp", "--activation", "relu", "--epochs", "3", "--lr", "3e-3", "--distill-from", best,
             "--distill-weight", "0.9", "--distill-temperature", "2"]
    student = train(tmp_path / "student", *flags)
    record = json.loads((student / "config.json").read_text())
    assert record["distill_from_sha256"] == {best: sha256_file(best)}
    assert "--distill-from" in command_for(record["config"]) and record["config"]["distill_temperature"] == 2.0
    assert json.loads((student / "metrics.json").read_text())["test_acc_torch"] > 0.8
    stopped = train(tmp_path / "part", *flags, "--stop-after", "1")
    resumed = main(parse_args(["--resume", str(stopped), "--no-progress"]))
    full, again = (json.loads((r / "metrics.json").read_text())["history"] for r in (student, resumed))
    assert [h["val_loss"] for h in full] == [h["val_loss"] for h in again]
