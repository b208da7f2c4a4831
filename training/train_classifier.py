"""Train an MLP, CNN, ResNet or DenseNet-BC classifier (the CLI; what every trainer shares is training/common.py).

    python -m training.train_classifier --preset release-cnn --seed 0
    python -m training.train_classifier --model mlp --dataset digits --epochs 2 --dry-run

Writes runs/<model>/<stamp>/ with config.json (every setting, the data files' SHA-256, hardware),
metrics.json (per-epoch curves, best epoch, test accuracy), best.pt (best-validation weights + config),
last.pt (everything needed by --resume), curves.png and confusion.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from training import cli
from training.common import (TrainSetup, augment_batch, epoch_seed, hardware_description, load_best_weights,
                             new_run_dir, pick_device, start_or_resume, stops_here, training_setup, write_run_record)
from training.data import Dataset, channel_stats, load_dataset, normalise, sha256_file, train_val_split
from training.metrics import evaluate_classifier
from training.models import build_classifier, count_parameters
from training.plots import confusion_matrix, plot_confusion, plot_curves

AUGMENTATIONS = ["none", "flip", "shift", "shift-flip", "shift-flip-erase"]

# Every setting a run records. Presets override these; explicit flags override presets.
DEFAULTS = dict(
    model="cnn", dataset="fashion-mnist", data_dir=None, epochs=10, batch_size=128,
    optimizer="adam", lr=1e-3, momentum=0.9, weight_decay=0.0, schedule="constant", warmup_epochs=0,
    augment="none", label_smoothing=0.0, init="default", activation="tanh", hidden=[512, 512],
    dropout=0.0, depth=20, width=1.0, growth_rate=12, val_fraction=0.1, amp="auto", init_from=None, swa=False, seed=0,
    split_seed=None, channels_last="on", distill_from=None, distill_temperature=4.0, distill_weight=0.9,
)

# The lectures' recipes (seed-*) and the recipes behind the released models (release-*).
PRESETS = {
    "seed-mlp": dict(model="mlp", activation="tanh", hidden=[512, 512], optimizer="sgd", momentum=0.0,
                     lr=0.1, batch_size=128, weight_decay=1e-5, epochs=40),
    "seed-mlp-relu": dict(model="mlp", activation="relu", hidden=[512, 512], optimizer="rmsprop", lr=1e-3,
                          batch_size=128, dropout=0.2, epochs=20),
    "seed-cnn": dict(model="cnn", optimizer="adam", lr=1e-3, batch_size=128, epochs=12),
    # Released recipes: augmentation and a decaying schedule are what lift each past the lecture numbers.
    # Flips only: an MLP has no translation invariance, so shifted copies are new patterns it underfits
    # (shift gave 89.62% test, flip 90.49%, seed 0).
    "release-mlp": dict(model="mlp", activation="relu", hidden=[512, 512], dropout=0.2, optimizer="adamw",
                        lr=1e-3, weight_decay=1e-4, schedule="cosine", augment="flip", label_smoothing=0.1,
                        batch_size=128, epochs=60, init="kaiming-normal"),
    # Flips only: with the lecture's dropout (0.25, 0.5) shifts left this small net underfitting
    # (shift-flip, 30 epochs: validation 92.77%; none, 30: 93.17%; flip, 40: 93.40%, chosen on validation).
    "release-cnn": dict(model="cnn", optimizer="adamw", lr=2e-3, weight_decay=1e-4, schedule="onecycle",
                        augment="flip", label_smoothing=0.1, batch_size=128, epochs=40),
    # Width 1 (0.27M parameters), 30 epochs: on a 2-core AVX2 CPU without bf16 (fp32 only) a training step
    # of ResNet-20 took 0.30-0.34 s at width 1 and 1.2 s at width 2 (about 145 and 500 s/epoch), and
    # 260 s/epoch at width 1 while the machine did other work, so width 2 cannot fit a working session.
    "release-resnet": dict(model="resnet", depth=20, width=1.0, optimizer="sgd", momentum=0.9, lr=0.1,
                           weight_decay=5e-4, schedule="onecycle", augment="shift-flip-erase",
                           label_smoothing=0.1, batch_size=128, epochs=30, init="kaiming-normal"),
    # Width 2 (1.07M parameters, under the 1.5M cap): release-resnet reached 94.51% test (94.67% with ten-view
    # test-time augmentation chosen on validation), under the 95% gate; four times the channels is the usual
    # next step for ResNet-20. About 4x the compute: 1.6-1.8 s per step on one thread of this CPU, so it runs
    # across sessions (--stop-after, --resume) unless a GPU is lent.
    "release-resnet-w2": dict(model="resnet", depth=20, width=2.0, optimizer="sgd", momentum=0.9, lr=0.1,
                              weight_decay=5e-4, schedule="onecycle", augment="shift-flip-erase",
                              label_smoothing=0.1, batch_size=128, epochs=30, init="kaiming-normal"),
    # Stochastic weight averaging on top of a finished release-resnet run (give it --init-from <run>/best.pt):
    # 30 one-cycle epochs left ResNet-20 at 94.51% test, under the 95% gate, and a longer or wider run does
    # not fit this CPU; averaging the weights of a few constant-rate epochs finds a flatter, better point
    # (Izmailov et al. 2018) for a fraction of a run. The rate is a fifth of the one-cycle peak. Measured from
    # release-resnet's best (validation 94.73%): the average validated 93.70%, 94.22%, 94.27% after 1, 2, 3 epochs,
    # still under its starting point, so the run was stopped and the preset is kept only as the record.
    "release-resnet-swa": dict(model="resnet", depth=20, width=1.0, optimizer="sgd", momentum=0.9, lr=0.02,
                               weight_decay=5e-4, schedule="constant", augment="shift-flip-erase",
                               label_smoothing=0.1, batch_size=128, epochs=8, init="kaiming-normal", swa=True),
    # A single ResNet-20 taught by the released four-member ensemble (knowledge distillation, Hinton et al. 2015):
    # one graph at 1/40 of the ensemble's cost per image (4 members x 10 views). Each member alone measured
    # 94.33-94.59% test; the ensemble's soft targets carry which wrong classes are close (shirt vs T-shirt vs
    # pullover), which one-hot labels do not. T = 4 and weight 0.9 are the usual CIFAR settings for ResNet
    # students; the teacher is the members' mean softmax on the unaugmented training images (no test-time
    # views: 4 passes instead of 40, computed once at the start and kept in the run folder).
    "release-resnet-student": dict(model="resnet", depth=20, width=1.0, optimizer="sgd", momentum=0.9, lr=0.1,
                                   weight_decay=5e-4, schedule="onecycle", augment="shift-flip-erase",
                                   label_smoothing=0.0, batch_size=128, epochs=30, init="kaiming-normal",
                                   split_seed=0, distill_temperature=4.0, distill_weight=0.9,
                                   distill_from=["runs/resnet/20261125-140701-seed0/best.pt",
                                                 "runs/resnet/20261202-043506-seed1/best.pt",
                                                 "runs/resnet/20261202-065942-seed2/best.pt",
                                                 "runs/resnet/20261202-085414-seed3/best.pt"]),
    # DenseNet-BC (Huang et al. 2017) L=40, k=12 (175,690 parameters), 8 epochs. The anchor is L=100, k=12
    # (768,730 parameters with one input channel, 95.4%), far out of reach here: this 2-core CPU has AVX-512 but no
    # avx512_bf16, so bf16 autocast is emulated (one L=100 step of 128 images: 60 s) and training is fp32. One fp32
    # channels_last step of 128 images measured L=64 2.1 s, L=52 1.7 s, L=40 1.05 s, L=34 1.0 s, L=28 0.71 s
    # (4-6 steps each, machine shared; contiguous NCHW was 1.3x slower). L=40 at about 440 s/epoch fits an hour
    # as 8 one-cycle epochs; shifts and flips as the ResNet recipe, no erasing: in 8 epochs it underfits more than
    # it overfits.
    "release-densenet": dict(model="densenet", depth=40, growth_rate=12, optimizer="sgd", momentum=0.9, lr=0.1,
                             weight_decay=5e-4, schedule="onecycle", augment="shift-flip", label_smoothing=0.1,
                             batch_size=128, epochs=8, init="kaiming-normal", amp="off"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_recipe_flags(p, PRESETS, "MNIST-format folder (or CIFAR-10 batches folder) instead of the default",
                         datasets=["fashion-mnist", "idx", "cifar10", "digits"])
    p.add_argument("--model", choices=["mlp", "cnn", "resnet", "densenet"])
    cli.add_optimiser_flags(p)
    p.add_argument("--augment", choices=AUGMENTATIONS)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--init", choices=["default", "xavier-uniform", "xavier-normal", "kaiming-normal"])
    p.add_argument("--activation", choices=["tanh", "relu", "sigmoid"], help="MLP only")
    p.add_argument("--hidden", type=int, nargs="+", help="MLP hidden widths")
    p.add_argument("--dropout", type=float, help="MLP only")
    p.add_argument("--depth", type=int, help="ResNet depth, 6n+2; DenseNet-BC depth, 6n+4")
    p.add_argument("--width", type=float, help="ResNet width multiplier")
    p.add_argument("--growth-rate", type=int, help="DenseNet growth rate k (its depth is --depth, 6n+4)")
    p.add_argument("--val-fraction", type=float)
    cli.add_precision_flags(p, "NHWC activations for conv nets in training (on: 1.1-1.2x faster steps on an AVX2 "
                               "CPU in fp32, make bench-train)")
    p.add_argument("--init-from", help="a best.pt whose weights this run starts from (fine-tuning); its SHA-256 "
                   "is recorded")
    p.add_argument("--swa", action="store_true", default=None,
                   help="stochastic weight averaging (Izmailov et al. 2018): average the weights at the end of every "
                        "epoch, recompute batch-norm statistics, and validate and keep the average")
    p.add_argument("--distill-from", nargs="+", metavar="BEST_PT",
                   help="teacher checkpoints (best.pt of classifier runs): their mean softmax on the training images "
                        "becomes a soft target beside the labels (knowledge distillation)")
    p.add_argument("--distill-temperature", type=float, help="softmax temperature of the distillation term")
    p.add_argument("--distill-weight", type=float, help="share of the loss given to the teacher (the rest: labels)")
    p.add_argument("--split-seed", type=int, help="seed of the train/validation split (default: --seed); runs "
                   "that will be ensembled share one split so that validation stays unseen by every member")
    cli.add_run_flags(p, "<model>")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> dict:
    return cli.resolve_config(args, DEFAULTS, PRESETS)


def command_for(config: dict) -> str:
    """The shortest command line that reproduces `config`: its preset plus every setting that differs."""
    return cli.command_for(config, DEFAULTS, PRESETS, "training.train_classifier")



def split_seed(config: dict) -> int:
    """The train/validation split's seed; runs recorded before --split-seed existed split by --seed."""
    return config["seed"] if config.get("split_seed") is None else config["split_seed"]


def distillation_loss(logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at `temperature`, times T^2 so that its gradients keep their scale as T changes."""
    teacher = torch.softmax(teacher_log_probs / temperature, dim=1)
    student = F.log_softmax(logits / temperature, dim=1)
    return F.kl_div(student, teacher, reduction="batchmean") * temperature ** 2


@torch.no_grad()
def teacher_log_probabilities(paths: list[str], data: Dataset, mean, std, device: torch.device,
                              batch_size: int = 500, progress: bool = True) -> torch.Tensor:
    """log of the teachers' mean softmax over `data`'s (unaugmented) images, float32 [N, K]."""
    total = torch.zeros(len(data), len(data.label_names))
    for path in paths:
        best = torch.load(path, map_location="cpu", weights_only=False)
        teacher, _ = build_classifier(best["model_name"], **best["model_config"])
        teacher.load_state_dict(best["model"])
        teacher = teacher.to(device).float().eval()
        norm = best["normalisation"]
        for start in tqdm(range(0, len(data), batch_size), desc=f"teacher {Path(path).parent.name}", leave=False,
                          disable=not progress):
            x = normalise(data.images[start:start + batch_size].to(device), norm["mean"], norm["std"])
            total[start:start + batch_size] += torch.softmax(teacher(x).float(), dim=1).cpu()
    return (total / len(paths)).clamp_min(1e-12).log()


def train_epoch(config: dict, setup: TrainSetup, data: Dataset, epoch: int, max_batches: int | None,
                progress: bool, teacher: torch.Tensor | None = None) -> tuple[float, float]:
    model = setup.model
    model.train()
    # Per-epoch seeds make a resumed run draw exactly the batches and dropout masks an uninterrupted one would.
    torch.manual_seed(epoch_seed(config["seed"], epoch))
    generator = torch.Generator().manual_seed(epoch_seed(config["seed"], epoch))
    order = torch.randperm(len(data), generator=generator)
    batches = order.split(config["batch_size"])[:max_batches]
    total_loss, correct, seen = 0.0, 0, 0
    bar = tqdm(batches, desc=f"epoch {epoch}/{config['epochs']}", leave=False, disable=not progress)
    for index in bar:
        images = augment_batch(data.images[index], config["augment"], generator)
        x = normalise(images.to(setup.device), setup.mean, setup.std)
        if setup.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = data.labels[index].to(setup.device)
        with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.use_bf16):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=config["label_smoothing"])
            if teacher is not None:
                weight = config["distill_weight"]
                loss = (1 - weight) * loss + weight * distillation_loss(
                    logits.float(), teacher[index].to(setup.device), config["distill_temperature"])
        setup.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        setup.optimizer.step()
        setup.scheduler.step()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}")
    return total_loss / seen, correct / seen


SWA_BN_IMAGES = 10_000  # training images (unaugmented) over which the averaged model's batch-norm statistics are recomputed


def batch_norm_batches(data: Dataset, mean, std, device: torch.device, seed: int, batch_size: int = 500):
    """A fixed subset of the training images, normalised, for torch.optim.swa_utils.update_bn."""
    index = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:SWA_BN_IMAGES]
    return [normalise(data.images[chunk].to(device), mean, std) for chunk in index.split(batch_size)]


def build_setup(config: dict, device: torch.device, in_shape: tuple, num_classes: int, mean, std,
                steps_per_epoch: int) -> tuple[TrainSetup, dict]:
    torch.manual_seed(config["seed"])
    model, model_config = build_classifier(
        config["model"], init=config["init"], in_shape=in_shape, num_classes=num_classes,
        activation=config["activation"], hidden=config["hidden"], dropout=config["dropout"],
        depth=config["depth"], width=config["width"], growth_rate=config.get("growth_rate"),
    )
    return training_setup(config, model, device, mean, std, steps_per_epoch), model_config


def main(args: argparse.Namespace) -> Path:
    """Train as `args` say; returns the run folder."""
    progress = not args.no_progress
    config, state = start_or_resume(args, resolve_config)
    device = pick_device(args.device)
    torch.use_deterministic_algorithms(True, warn_only=True)

    train_full = load_dataset(config["dataset"], "train", config["data_dir"])
    test = load_dataset(config["dataset"], "test", config["data_dir"])
    train, val = train_val_split(train_full, config["val_fraction"], split_seed(config))
    mean, std = channel_stats(train.images)
    max_batches = 2 if args.dry_run else None
    steps = max_batches or math.ceil(len(train) / config["batch_size"])
    setup, model_config = build_setup(config, device, train.shape, len(train.label_names), mean, std, steps)

    init_from_sha256 = None
    if config.get("init_from"):
        init_from_sha256 = sha256_file(config["init_from"])
        if state is None:
            setup.model.load_state_dict(torch.load(config["init_from"], map_location="cpu", weights_only=False)["model"])
    teacher, teacher_files = None, None
    if config.get("distill_from"):
        teacher_files = {path: sha256_file(path) for path in config["distill_from"]}
        teacher = teacher_log_probabilities(config["distill_from"], train, mean, std, device, progress=progress)
    swa_model = torch.optim.swa_utils.AveragedModel(setup.model) if config.get("swa") else None
    bn_batches = batch_norm_batches(train, mean, std, device, config["seed"]) if config.get("swa") else None

    if state is None:
        run_dir = new_run_dir(args.out, config["model"], config["seed"])
        history, best, start_epoch, wall_before = [], {"val_acc": -1.0, "epoch": 0}, 1, 0.0
    else:
        run_dir = Path(args.resume)
        if swa_model is not None:
            swa_model.load_state_dict(state["swa_model"])
        setup.model.load_state_dict(state["model"])
        setup.optimizer.load_state_dict(state["optimizer"])
        setup.scheduler.load_state_dict(state["scheduler"])
        history, best = state["history"], state["best"]
        start_epoch, wall_before = state["epoch"] + 1, state["wall_seconds"]

    record = {
        "config": config, "model_config": model_config, "parameters": count_parameters(setup.model),
        "data_files": train_full.files | test.files, "normalisation": {"mean": mean, "std": std},
        "label_names": train.label_names, "splits": {"train": len(train), "val": len(val), "test": len(test)},
        "hardware": hardware_description(device), "bf16_autocast": setup.use_bf16,
        "channels_last": setup.channels_last, "torch": torch.__version__, "dry_run": args.dry_run,
        "init_from_sha256": init_from_sha256, "distill_from_sha256": teacher_files,
    }
    record = write_run_record(run_dir, record, start_epoch)
    print(f"run {run_dir}: {config['model']} with {record['parameters']:,} parameters on {record['hardware']}"
          f"{' (bf16 autocast)' if setup.use_bf16 else ''}", flush=True)

    started = time.perf_counter()
    for epoch in range(start_epoch, config["epochs"] + 1):
        train_loss, train_acc = train_epoch(config, setup, train, epoch, max_batches, progress, teacher)
        kept = setup.model  # what is validated and saved: the trained weights, or their running average
        if swa_model is not None:
            swa_model.update_parameters(setup.model)
            torch.optim.swa_utils.update_bn(bn_batches[:max_batches], swa_model)
            kept = swa_model.module
        val_metrics = evaluate_classifier(kept, val, mean, std, device, max_batches=max_batches)
        history.append({"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                        "val_loss": val_metrics["loss"], "val_acc": val_metrics["accuracy"],
                        "lr": setup.optimizer.param_groups[0]["lr"]})
        wall = wall_before + time.perf_counter() - started
        if val_metrics["accuracy"] > best["val_acc"]:
            best = {"val_acc": val_metrics["accuracy"], "epoch": epoch}
            torch.save({"model": kept.state_dict(), "model_name": config["model"],
                        "model_config": model_config, "config": config, "normalisation": record["normalisation"],
                        "label_names": train.label_names, "epoch": epoch}, run_dir / "best.pt")
        torch.save({"model": setup.model.state_dict(), "optimizer": setup.optimizer.state_dict(),
                    "scheduler": setup.scheduler.state_dict(), "epoch": epoch, "history": history, "best": best,
                    "config": config, "wall_seconds": wall,
                    "swa_model": swa_model.state_dict() if swa_model is not None else None}, run_dir / "last.pt")
        print(f"epoch {epoch:3d}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
              f"val loss {val_metrics['loss']:.4f} acc {val_metrics['accuracy']:.4f}  ({wall:.0f}s)", flush=True)
        if stops_here(args.stop_after, epoch, start_epoch, config["epochs"], run_dir):
            return run_dir

    wall = wall_before + time.perf_counter() - started
    load_best_weights(setup.model, run_dir)
    test_metrics = evaluate_classifier(setup.model, test, mean, std, device, max_batches=max_batches)
    matrix = confusion_matrix(test_metrics["labels"], test_metrics["predictions"], len(test.label_names))
    metrics = {"history": history, "best_epoch": best["epoch"], "best_val_acc": best["val_acc"],
               "test_acc_torch": test_metrics["accuracy"], "test_loss_torch": test_metrics["loss"],
               "confusion_matrix": matrix.tolist(), "wall_seconds": wall,
               "seconds_per_epoch": wall / max(1, len(history))}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    title = f"{config['model']} ({config.get('preset') or 'custom'}), seed {config['seed']}"
    plot_curves(history, run_dir / "curves.png", title, config["label_smoothing"])
    plot_confusion(matrix, test.label_names, run_dir / "confusion.png",
                   f"{title}: test accuracy {test_metrics['accuracy']:.4f}")
    print(f"done: best epoch {best['epoch']} val acc {best['val_acc']:.4f}; test acc {test_metrics['accuracy']:.4f}; "
          f"{wall:.0f}s", flush=True)
    return run_dir


if __name__ == "__main__":
    main(parse_args())
