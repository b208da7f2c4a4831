"""Train SegNet on Fashion-MNIST scenes: per-pixel labels over 11 classes (background + 10 garments).

    python -m training.train_segnet --preset release-segnet --seed 0
    python -m training.train_segnet --epochs 2 --canvas 32 32 --widths 8 16 --dry-run

Every epoch draws fresh training scenes from the training split (seeded by seed and epoch, so a resumed run
sees the scenes an uninterrupted one would); the model is chosen on the mean IoU of fixed scenes built from
the seeded validation split of the training set, and measured once at the end on the 2,000 fixed test
scenes built from test images only (training.scenes.fixed_test_scenes). With --pretrain-epochs N the encoder
is first trained for N epochs as a classifier of single items (global average pooling and a linear layer on
top, thrown away afterwards), as SegNet started from a classifier's encoder.

Writes runs/segnet/<stamp>-seed<N>/ with config.json (every setting, the data files' SHA-256, hardware),
metrics.json (per-epoch curves, best epoch, test per-class IoU, mIoU, pixel accuracy), best.pt (best-validation
weights + config), last.pt (everything --resume needs), curves.png, class_iou.png, test_overlay.png
(prediction vs truth on test scenes) and scenes.png (training scenes beside their masks).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import cli
from training.common import (TrainSetup, epoch_seed, hardware_description, load_best_weights, make_optimizer,
                             new_run_dir, pick_device, start_or_resume, stops_here, training_setup, write_run_record)
from training.data import Dataset, channel_stats, load_dataset, normalise, train_val_split
from training.metrics import evaluate_classifier, pixel_confusion, segmentation_scores
from training.models import build_segmenter, count_parameters
from training.plots import plot_class_iou, plot_scenes, plot_segmentation_curves
from training.scenes import (ITEM_THRESHOLD, MAX_ITEMS, SCALE_RANGE, STATS_SCENE_SEED_OFFSET, TEST_SCENE_SEED,
                             TEST_SCENES, VAL_SCENE_SEED_OFFSET, Scenes, fixed_test_scenes, make_scenes,
                             scene_label_names, write_example_sheet)
# Every setting a run records. Presets override these; explicit flags override presets.
DEFAULTS = dict(
    model="segnet", dataset="fashion-mnist", data_dir=None, epochs=10, batch_size=64,
    optimizer="adamw", lr=2e-3, momentum=0.9, weight_decay=1e-4, schedule="onecycle", warmup_epochs=0,
    widths=[32, 64, 128], convs_per_stage=2, init="kaiming-normal", canvas=[64, 64],
    train_scenes_per_epoch=20000, val_scenes=1000, val_fraction=0.1, augment="flip", amp="auto", channels_last="on",
    pretrain_epochs=0, pretrain_canvas=[48, 48], seed=0,
)

PRESETS = {
    # Four stages of (16, 32, 64, 128), 0.59M parameters, stride 16: measured on 2 busy CPU threads at 1.0 s
    # per 64-scene step against 3.2 s for three stages of (32, 64, 128) with as many parameters, because the
    # full-resolution stage costs the most and is the narrowest here; the extra stage also widens the
    # receptive field past one whole item at the largest scale (45 px), which the garment class depends on.
    # AdamW with one-cycle: fresh scenes every epoch are endless data, so no regulariser beyond mirrored items.
    "release-segnet": dict(widths=[16, 32, 64, 128], convs_per_stage=2, optimizer="adamw", lr=3e-3,
                           weight_decay=1e-4, schedule="onecycle", batch_size=64, epochs=30,
                           train_scenes_per_epoch=20000, augment="flip"),
    # release-segnet (0.59M) underfit: train and validation loss level at 0.164 / 0.166, test mIoU 0.692, whole
    # items given the wrong garment class. This keeps the two cheap full-resolution stages and widens the two
    # deep ones 2x: 2.18M parameters (8.7 MB as ONNX) for 1.3x the step time (0.178-0.190 s against 0.141 s per
    # 64-scene step, bf16 autocast on 2 AMX cores), where widening every stage to (32, 64, 128, 256) costs 2.4x
    # for as many parameters. A fifth stage of 512 (9.26M, 37 MB) cost 2.4x too, and its checkpoints would be
    # too large to commit. Ten more epochs, since fresh scenes every epoch cannot be overfit.
    "release-segnet-wide": dict(widths=[16, 32, 128, 256], convs_per_stage=2, optimizer="adamw", lr=3e-3,
                                weight_decay=1e-4, schedule="onecycle", batch_size=64, epochs=40,
                                train_scenes_per_epoch=20000, augment="flip"),
    # release-segnet-wide still underfit (test mIoU 0.734) and named the wrong garment far more often than it
    # drew the wrong outline (garment-vs-background IoU 0.967). SegNet's authors started the encoder from a
    # classifier (VGG16); this one first trains the encoder to classify single items on 48x48 canvases for 10
    # epochs (75 s each here: an item costs far less than a 64x64 scene of up to four). Measured on a short
    # schedule (8 epochs of 5,000 scenes, seed 0): validation mIoU 0.506 after 3 pretraining epochs against
    # 0.331 without. 55 segmentation epochs: what fits a working session on 2 cores with the pretraining.
    # Outcome (seed 0, 5,754 s): test mIoU 0.739 against the wide preset's 0.734; the head start (validation
    # 0.528 against 0.348 at epoch 5) was gone by epoch 20, when the one-cycle rate peaks.
    "release-segnet-pretrained": dict(widths=[16, 32, 128, 256], convs_per_stage=2, optimizer="adamw", lr=3e-3,
                                      weight_decay=1e-4, schedule="onecycle", batch_size=64, epochs=55,
                                      train_scenes_per_epoch=20000, augment="flip", pretrain_epochs=10,
                                      pretrain_canvas=[48, 48]),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_recipe_flags(p, PRESETS, "MNIST-format folder instead of the default Fashion-MNIST location")
    cli.add_optimiser_flags(p)
    p.add_argument("--widths", type=int, nargs="+", help="channels of each encoder stage (stride 2**stages)")
    p.add_argument("--convs-per-stage", type=int)
    p.add_argument("--init", choices=["default", "xavier-uniform", "xavier-normal", "kaiming-normal"])
    p.add_argument("--canvas", type=int, nargs=2, metavar=("H", "W"), help="scene size, multiples of the stride")
    p.add_argument("--train-scenes-per-epoch", type=int)
    p.add_argument("--val-scenes", type=int)
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--augment", choices=["none", "flip"], help="mirror each item of a training scene with p=1/2")
    cli.add_precision_flags(p, "NHWC activations in training (on: 1.19x faster steps on an AVX2 CPU in fp32, "
                               "make bench-train)")
    p.add_argument("--pretrain-epochs", type=int,
                   help="first train the encoder alone as a classifier of single items for this many epochs")
    p.add_argument("--pretrain-canvas", type=int, nargs=2, metavar=("H", "W"),
                   help="canvas of the single-item pretraining scenes, multiples of the stride")
    cli.add_run_flags(p, "segnet", dry_run_help="two batches per epoch and per evaluation")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> dict:
    return cli.resolve_config(args, DEFAULTS, PRESETS)


def command_for(config: dict) -> str:
    """The shortest command line that reproduces `config`: its preset plus every setting that differs."""
    return cli.command_for(config, DEFAULTS, PRESETS, "training.train_segnet")


# --- training ---------------------------------------------------------------------------------------
def train_epoch(config: dict, setup: TrainSetup, train_items, epoch: int, max_batches: int | None,
                progress: bool) -> tuple[float, float]:
    model = setup.model
    model.train()
    torch.manual_seed(epoch_seed(config["seed"], epoch))
    n = config["train_scenes_per_epoch"]
    if max_batches is not None:
        n = min(n, max_batches * config["batch_size"])
    height, width = config["canvas"]
    # Fresh scenes each epoch: the generator is cheap next to a training step, and new layouts every epoch
    # mean the net cannot memorise a fixed set of scenes.
    scenes = make_scenes(train_items, n, epoch_seed(config["seed"], epoch), height, width,
                         flip=config["augment"] == "flip")
    total_loss, correct, seen = 0.0, 0, 0
    starts = range(0, n, config["batch_size"])
    bar = tqdm(starts, desc=f"epoch {epoch}/{config['epochs']}", leave=False, disable=not progress)
    for start in bar:
        x = normalise(scenes.images[start:start + config["batch_size"]].to(setup.device), setup.mean, setup.std)
        if setup.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = scenes.masks[start:start + config["batch_size"]].to(setup.device).long()
        with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.use_bf16):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y)  # mean over every pixel of the batch
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        setup.optimizer.step()
        setup.scheduler.step()
        total_loss += loss.item() * y.numel()
        correct += (logits.argmax(1) == y).sum().item()
        seen += y.numel()
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", pixel_acc=f"{correct / seen:.4f}")
    return total_loss / seen, correct / seen


@torch.no_grad()
def evaluate(model: torch.nn.Module, scenes: Scenes, mean: list[float], std: list[float], device: torch.device,
             label_names: list[str], batch_size: int = 128, max_batches: int | None = None,
             keep_predictions: int = 0) -> dict:
    """fp32 evaluation over scenes: per-pixel loss, the pixel confusion matrix and the scores it gives."""
    model.eval()
    k = len(label_names)
    confusion = torch.zeros(k, k, dtype=torch.int64)
    loss_sum, kept = 0.0, []
    for start in list(range(0, len(scenes), batch_size))[:max_batches]:
        x = normalise(scenes.images[start:start + batch_size].to(device), mean, std)
        y = scenes.masks[start:start + batch_size].to(device).long()
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        predicted = logits.argmax(1)
        confusion += pixel_confusion(y.cpu(), predicted.cpu(), k)
        if sum(len(p) for p in kept) < keep_predictions:
            kept.append(predicted.to(torch.uint8).cpu())
    scores = segmentation_scores(confusion, label_names)
    return {"loss": loss_sum / max(scores["pixels"], 1), **scores, "confusion": confusion.numpy(),
            "predictions": torch.cat(kept)[:keep_predictions] if kept else None}


# --- encoder pretraining ---------------------------------------------------------------------------
# Seeds of the single-item pretraining scenes sit apart from the segmentation scenes' seeds.
PRETRAIN_SCENE_SEED_OFFSET = 40_000_000


class EncoderClassifier(torch.nn.Module):
    """SegNet's encoder with global average pooling and one linear layer on top: a classifier of one item.

    SegNet initialises its encoder from VGG16 trained to classify ImageNet; here the encoder first learns to
    tell the ten garments apart on single items, which is what a segmenter trained from scratch learns last
    (it finds the outlines long before it names the garment). Only the encoder's weights carry over.
    """

    def __init__(self, segnet: torch.nn.Module, num_classes: int):
        super().__init__()
        self.encoder = segnet.encoder  # shared: training this trains the segmenter's encoder
        self.head = torch.nn.Linear(segnet.encoder[-1].convs[-1][0].out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.encoder:
            x, _ = stage(x)
        return self.head(x.mean((2, 3)))


def single_item_scenes(items, n: int, seed: int, canvas: list[int], flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` canvases holding one item each, at the scenes' scales and random positions: images and classes."""
    scenes = make_scenes(items, n, seed, canvas[0], canvas[1], min_items=1, max_items=1, flip=flip)
    return scenes.images, scenes.classes[:, 0]


def pretrain_encoder(config: dict, setup: TrainSetup, train_items, val_items, max_batches: int | None,
                     progress: bool) -> list[dict]:
    """Train the encoder (and a throw-away linear head) to classify single items; returns per-epoch records.

    Every training item once per epoch, on fresh single-item canvases (seeded by seed and epoch); AdamW with
    its own one-cycle schedule at the run's peak rate; accuracy on single-item canvases of the validation items.
    """
    device, k = setup.device, len(train_items.label_names)
    torch.manual_seed(config["seed"])
    classifier = EncoderClassifier(setup.model, k).to(device)
    if setup.channels_last:
        classifier = classifier.to(memory_format=torch.channels_last)
    epochs, bs = config["pretrain_epochs"], config["batch_size"]
    n = len(train_items) if max_batches is None else min(len(train_items), max_batches * bs)
    optimizer = make_optimizer(config, classifier)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config["lr"],
                                                    total_steps=epochs * math.ceil(n / bs))
    val = Dataset(*single_item_scenes(val_items, len(val_items), PRETRAIN_SCENE_SEED_OFFSET + config["seed"],
                                      config["pretrain_canvas"], flip=False), val_items.label_names, "single items")
    history = []
    for epoch in range(1, epochs + 1):
        classifier.train()
        x_all, y_all = single_item_scenes(train_items, n, PRETRAIN_SCENE_SEED_OFFSET + epoch_seed(
            config["seed"], epoch), config["pretrain_canvas"], flip=config["augment"] == "flip")
        total_loss, correct = 0.0, 0
        bar = tqdm(range(0, n, bs), desc=f"encoder pretraining {epoch}/{epochs}", leave=False, disable=not progress)
        for start in bar:
            x = normalise(x_all[start:start + bs].to(device), setup.mean, setup.std)
            if setup.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y_all[start:start + bs].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=setup.use_bf16):
                logits = classifier(x)
                loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
        checked = evaluate_classifier(classifier, val, setup.mean, setup.std, device, batch_size=256,
                                      max_batches=max_batches)
        history.append({"epoch": epoch, "train_loss": total_loss / n, "train_accuracy": correct / n,
                        "val_accuracy": checked["accuracy"]})
        print(f"pretrain {epoch:3d}  train loss {total_loss / n:.4f} accuracy {correct / n:.4f}  "
              f"val accuracy {checked['accuracy']:.4f} ({len(checked['labels'])} single items)", flush=True)
    return history


def build_setup(config: dict, device: torch.device, num_classes: int, mean, std,
                steps_per_epoch: int) -> tuple[TrainSetup, dict]:
    torch.manual_seed(config["seed"])
    model, model_config = build_segmenter(config["model"], init=config["init"], num_classes=num_classes,
                                          widths=config["widths"], convs_per_stage=config["convs_per_stage"])
    return training_setup(config, model, device, mean, std, steps_per_epoch), model_config


def check_canvas(config: dict) -> None:
    """Both canvases a run uses (the scenes', and the pretraining one when it pretrains) fit the stride."""
    stride = 2 ** len(config["widths"])
    flags = {"canvas": "--canvas"} | ({"pretrain_canvas": "--pretrain-canvas"} if config["pretrain_epochs"] else {})
    for key, flag in flags.items():
        if any(side % stride for side in config[key]):
            raise ValueError(f"{flag} {config[key]} must be multiples of the stride {stride} "
                             f"(2 ** {len(config['widths'])} stages)")


def main(args: argparse.Namespace) -> Path:
    """Train as `args` say; returns the run folder."""
    progress = not args.no_progress
    config, state = start_or_resume(args, resolve_config)
    check_canvas(config)
    device = pick_device(args.device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Non-overlapping 2x2 pooling gives every unpooled value its own output cell, so the scatter inside
    # max_unpool2d never races and is deterministic here; PyTorch warns about the operator in general.
    warnings.filterwarnings("ignore", message="max_unpooling2d_forward_out does not have a deterministic")

    train_full = load_dataset(config["dataset"], "train", config["data_dir"])
    test_items = load_dataset(config["dataset"], "test", config["data_dir"])
    train_items, val_items = train_val_split(train_full, config["val_fraction"], config["seed"])
    label_names = scene_label_names(train_full)
    height, width = config["canvas"]
    val = make_scenes(val_items, config["val_scenes"], VAL_SCENE_SEED_OFFSET + config["seed"], height, width)
    test = fixed_test_scenes(TEST_SCENES, TEST_SCENE_SEED, height, width, test=test_items)
    # Normalisation statistics of scenes (mostly black canvas), not of the centred 28x28 items.
    mean, std = channel_stats(make_scenes(train_items, 1000, STATS_SCENE_SEED_OFFSET + config["seed"],
                                          height, width).images)
    max_batches = 2 if args.dry_run else None
    steps = max_batches or math.ceil(config["train_scenes_per_epoch"] / config["batch_size"])
    setup, model_config = build_setup(config, device, len(label_names), mean, std, steps)

    if state is None:
        run_dir = new_run_dir(args.out, config["model"], config["seed"])
        history, best, start_epoch, wall_before = [], {"val_miou": -1.0, "epoch": 0}, 1, 0.0
        pretrain_history = []
    else:
        run_dir = Path(args.resume)
        setup.model.load_state_dict(state["model"])
        setup.optimizer.load_state_dict(state["optimizer"])
        setup.scheduler.load_state_dict(state["scheduler"])
        history, best = state["history"], state["best"]
        start_epoch, wall_before = state["epoch"] + 1, state["wall_seconds"]
        pretrain_history = state.get("pretrain_history", [])

    scene_spec = {"generator": "training.scenes", "items_per_scene": [1, MAX_ITEMS], "scale": list(SCALE_RANGE),
                  "threshold": ITEM_THRESHOLD, "canvas": [height, width],
                  "train": {"source": train_items.name, "per_epoch": config["train_scenes_per_epoch"],
                            "seed": "seed * 1000 + epoch", "mirrored_items": config["augment"] == "flip"},
                  "val": {"source": val_items.name, "scenes": len(val), "seed": VAL_SCENE_SEED_OFFSET + config["seed"]},
                  "test": {"source": test_items.name, "scenes": len(test), "seed": TEST_SCENE_SEED}}
    record = {
        "config": config, "model_config": model_config, "parameters": count_parameters(setup.model),
        "stride": setup.model.stride, "data_files": train_full.files | test_items.files,
        "normalisation": {"mean": mean, "std": std}, "label_names": label_names, "scenes": scene_spec,
        "splits": {"train_items": len(train_items), "val_items": len(val_items), "test_items": len(test_items)},
        "hardware": hardware_description(device), "bf16_autocast": setup.use_bf16,
        "channels_last": setup.channels_last, "torch": torch.__version__, "dry_run": args.dry_run,
        "command": command_for(config),
    }
    record = write_run_record(run_dir, record, start_epoch)
    if state is None:
        write_example_sheet(run_dir / "scenes.png", make_scenes(train_items, 8, epoch_seed(config["seed"], 1),
                                                                height, width), label_names, 8,
                            f"training scenes, {height}x{width}, threshold {ITEM_THRESHOLD}")
    print(f"run {run_dir}: segnet with {record['parameters']:,} parameters, stride {record['stride']}, "
          f"on {record['hardware']}{' (bf16 autocast)' if setup.use_bf16 else ''}", flush=True)

    started = time.perf_counter()
    if state is None and config["pretrain_epochs"]:
        pretrain_history = pretrain_encoder(config, setup, train_items, val_items, max_batches, progress)
        # Segmentation then starts its own optimiser and schedule; only the encoder's weights carry over.
        print(f"encoder pretrained in {time.perf_counter() - started:.0f}s", flush=True)
    for epoch in range(start_epoch, config["epochs"] + 1):
        train_loss, train_acc = train_epoch(config, setup, train_items, epoch, max_batches, progress)
        val_metrics = evaluate(setup.model, val, mean, std, device, label_names, max_batches=max_batches)
        history.append({"epoch": epoch, "train_loss": train_loss, "train_pixel_acc": train_acc,
                        "val_loss": val_metrics["loss"], "val_pixel_acc": val_metrics["pixel_accuracy"],
                        "val_miou": val_metrics["miou"], "lr": setup.optimizer.param_groups[0]["lr"]})
        wall = wall_before + time.perf_counter() - started
        if val_metrics["miou"] > best["val_miou"]:
            best = {"val_miou": val_metrics["miou"], "epoch": epoch}
            torch.save({"model": setup.model.state_dict(), "model_name": config["model"],
                        "model_config": model_config, "config": config, "normalisation": record["normalisation"],
                        "label_names": label_names, "stride": setup.model.stride, "epoch": epoch},
                       run_dir / "best.pt")
        torch.save({"model": setup.model.state_dict(), "optimizer": setup.optimizer.state_dict(),
                    "scheduler": setup.scheduler.state_dict(), "epoch": epoch, "history": history, "best": best,
                    "config": config, "wall_seconds": wall, "pretrain_history": pretrain_history},
                   run_dir / "last.pt")
        print(f"epoch {epoch:3d}  train loss {train_loss:.4f} pixel acc {train_acc:.4f}  val loss "
              f"{val_metrics['loss']:.4f} pixel acc {val_metrics['pixel_accuracy']:.4f} mIoU {val_metrics['miou']:.4f}"
              f"  ({wall:.0f}s)", flush=True)
        if stops_here(args.stop_after, epoch, start_epoch, config["epochs"], run_dir):
            return run_dir

    wall = wall_before + time.perf_counter() - started
    load_best_weights(setup.model, run_dir)
    test_metrics = evaluate(setup.model, test, mean, std, device, label_names, max_batches=max_batches,
                            keep_predictions=8)
    metrics = {"pretrain_history": pretrain_history, "history": history, "best_epoch": best["epoch"],
               "best_val_miou": best["val_miou"],
               "test_torch": {"scenes": test_metrics["pixels"] // (height * width), "seed": TEST_SCENE_SEED,
                              "loss": test_metrics["loss"], "miou": test_metrics["miou"],
                              "pixel_accuracy": test_metrics["pixel_accuracy"],
                              "per_class_iou": test_metrics["per_class_iou"]},
               "test_confusion_matrix": test_metrics["confusion"].tolist(), "wall_seconds": wall,
               "seconds_per_epoch": wall / max(1, len(history))}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    title = f"segnet ({config.get('preset') or 'custom'}), seed {config['seed']}"
    plot_segmentation_curves(history, run_dir / "curves.png", title)
    plot_class_iou(test_metrics["per_class_iou"], run_dir / "class_iou.png",
                   f"{title}: test IoU per class (PyTorch, {metrics['test_torch']['scenes']} scenes)")
    shown = len(test_metrics["predictions"])
    plot_scenes(test.images[:shown], test.masks[:shown], label_names, run_dir / "test_overlay.png",
                predictions=test_metrics["predictions"], title=f"{title}: test scenes, prediction vs truth")
    print(f"done: best epoch {best['epoch']} val mIoU {best['val_miou']:.4f}; test mIoU {test_metrics['miou']:.4f}, "
          f"pixel accuracy {test_metrics['pixel_accuracy']:.4f}; {wall:.0f}s", flush=True)
    return run_dir


if __name__ == "__main__":
    main(parse_args())
