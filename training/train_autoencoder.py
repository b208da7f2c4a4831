"""Train the convolutional autoencoder on Fashion-MNIST training images (labels unused).

    python -m training.train_autoencoder --preset release-autoencoder --seed 0
    python -m training.train_autoencoder --epochs 1 --dry-run

Writes runs/autoencoder/<stamp>-seed<N>/ with config.json (every setting, the data files' SHA-256, hardware),
metrics.json (per-epoch training and validation reconstruction error, best epoch, test error per class, wall
time), best.pt (best-validation weights + config, what export/autoencoder.py reads), last.pt (everything
--resume needs), curves.png and reconstructions.png (test images above their reconstructions).
The error is the mean squared difference per pixel with pixels in [0, 1], the figure the exported graph's
`error` output gives per image.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from training import cli  # noqa: E402
from training.common import (augment_batch, epoch_seed, hardware_description, load_best_weights,  # noqa: E402
                             new_run_dir, pick_device, start_or_resume, write_run_record)
from training.data import Dataset, load_dataset, train_val_split  # noqa: E402
from training.models import count_parameters  # noqa: E402
from training.models.autoencoder import Autoencoder, AutoencoderConfig  # noqa: E402
from training.plots import save_image_grid  # noqa: E402

DEFAULTS = dict(dataset="fashion-mnist", data_dir=None, epochs=10, batch_size=128, lr=2e-3, weight_decay=1e-5,
                channels=32, code_dim=32, augment="flip", val_fraction=0.1, seed=0)

PRESETS = {
    # A 32-number code: small enough that a garment's outline and shading are what it can keep (an OOD image is
    # then badly reconstructed), large enough for a recognisable reconstruction. Adam with a cosine decay;
    # mirrored images are free extra data for left-right symmetric garments. 4 epochs: on the shared 2-core CPU
    # (load 11-15 while this was trained) a first 12-epoch run had not finished its first epoch in 17 minutes.
    "release-autoencoder": dict(epochs=4, batch_size=128, lr=2e-3, weight_decay=1e-5, channels=32, code_dim=32,
                                augment="flip"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_recipe_flags(p, PRESETS, "MNIST-format folder of 28x28 images instead of the default Fashion-MNIST",
                         datasets=["fashion-mnist", "idx"])
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--channels", type=int, help="the first convolution's width (the second: twice)")
    p.add_argument("--code-dim", type=int, help="the bottleneck's size")
    p.add_argument("--augment", choices=["none", "flip"])
    p.add_argument("--val-fraction", type=float)
    cli.add_run_flags(p, "autoencoder", stop_after=False)
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> dict:
    return cli.resolve_config(args, DEFAULTS, PRESETS)


def command_for(config: dict) -> str:
    """The shortest command line that reproduces `config`: its preset plus every setting that differs."""
    return cli.command_for(config, DEFAULTS, PRESETS, "training.train_autoencoder")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]: the autoencoder's input and its sigmoid's range."""
    return images.float() / 255.0


def per_image_error(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image over its pixels, pixels in [0, 1]: float [N]."""
    return (reconstruction - target).pow(2).flatten(1).mean(1)


def train_epoch(config: dict, model: Autoencoder, optimizer, scheduler, data: Dataset, epoch: int,
                device: torch.device, max_batches: int | None, progress: bool) -> float:
    model.train()
    generator = torch.Generator().manual_seed(epoch_seed(config["seed"], epoch))  # a resumed run draws the same batches
    batches = torch.randperm(len(data), generator=generator).split(config["batch_size"])[:max_batches]
    total, seen = 0.0, 0
    bar = tqdm(batches, desc=f"epoch {epoch}/{config['epochs']}", leave=False, disable=not progress)
    for index in bar:
        x = to_unit(augment_batch(data.images[index], config["augment"], generator).to(device))
        loss = F.mse_loss(model(x), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(x)
        seen += len(x)
        bar.set_postfix(mse=f"{total / seen:.5f}")
    return total / seen


@torch.no_grad()
def errors_of(model: Autoencoder, images: torch.Tensor, device: torch.device, batch_size: int = 1000,
              max_batches: int | None = None) -> np.ndarray:
    """Per-image reconstruction error of uint8 images, float32 [N] (fp32, eval mode)."""
    model.eval()
    out = []
    for start in list(range(0, len(images), batch_size))[:max_batches]:
        x = to_unit(images[start:start + batch_size].to(device))
        out.append(per_image_error(model(x), x).cpu())
    return torch.cat(out).numpy().astype(np.float32)


@torch.no_grad()
def reconstruct_uint8(model: Autoencoder, images: torch.Tensor) -> np.ndarray:
    model.eval()
    return (model(to_unit(images)) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def save_reconstructions(model: Autoencoder, data: Dataset, path: Path, title: str) -> None:
    """Two test images of each class (row 1) above their reconstructions (row 2)."""
    picks = [int(i) for k in range(len(data.label_names)) for i in (data.labels == k).nonzero().flatten()[:2]]
    originals = data.images[picks]
    save_image_grid(np.concatenate([originals.numpy(), reconstruct_uint8(model, originals)]), path,
                    columns=len(picks), title=title, row_labels=["test image", "reconstruction"])


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_mse"] for h in history], label="train (augmented)")
    ax.plot(epochs, [h["val_mse"] for h in history], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction MSE per pixel ([0, 1] pixels)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> Path:
    """Train as `args` say; returns the run folder."""
    progress = not args.no_progress
    config, state = start_or_resume(args, resolve_config)
    device = pick_device(args.device)
    torch.use_deterministic_algorithms(True, warn_only=True)

    train_full = load_dataset(config["dataset"], "train", config["data_dir"])
    test = load_dataset(config["dataset"], "test", config["data_dir"])
    train, val = train_val_split(train_full, config["val_fraction"], config["seed"])
    cfg = AutoencoderConfig(in_shape=tuple(train.shape), channels=config["channels"], code_dim=config["code_dim"])
    torch.manual_seed(config["seed"])
    model = Autoencoder(cfg).to(device)
    max_batches = 2 if args.dry_run else None
    steps = max_batches or math.ceil(len(train) / config["batch_size"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["epochs"] * steps)

    if state is None:
        run_dir = new_run_dir(args.out, "autoencoder", config["seed"])
        history, best, start_epoch, wall_before = [], {"val_mse": math.inf, "epoch": 0}, 1, 0.0
    else:
        run_dir = Path(args.resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best, start_epoch, wall_before = state["history"], state["best"], state["epoch"] + 1, state["wall_seconds"]

    record = {
        "config": config, "model_config": asdict(cfg), "command": command_for(config),
        "parameters": count_parameters(model), "data_files": train_full.files | test.files,
        "label_names": train.label_names, "splits": {"train": len(train), "val": len(val), "test": len(test)},
        "hardware": hardware_description(device), "torch": torch.__version__, "dry_run": args.dry_run,
    }
    record = write_run_record(run_dir, record, start_epoch)
    print(f"run {run_dir}: autoencoder with {record['parameters']:,} parameters on {record['hardware']}", flush=True)

    started = time.perf_counter()
    for epoch in range(start_epoch, config["epochs"] + 1):
        train_mse = train_epoch(config, model, optimizer, scheduler, train, epoch, device, max_batches, progress)
        val_mse = float(errors_of(model, val.images, device, max_batches=max_batches).mean())
        wall = wall_before + time.perf_counter() - started
        history.append({"epoch": epoch, "train_mse": train_mse, "val_mse": val_mse,
                        "lr": optimizer.param_groups[0]["lr"], "wall_seconds": wall})
        if val_mse < best["val_mse"]:
            best = {"val_mse": val_mse, "epoch": epoch}
            torch.save({"model": model.state_dict(), "model_config": asdict(cfg), "config": config,
                        "label_names": train.label_names, "epoch": epoch}, run_dir / "best.pt")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch, "history": history, "best": best,
                    "config": config, "wall_seconds": wall}, run_dir / "last.pt")
        print(f"epoch {epoch:3d}  train mse {train_mse:.5f}  val mse {val_mse:.5f}  ({wall:.0f}s)", flush=True)
        if not math.isfinite(train_mse):
            raise SystemExit(f"training diverged at epoch {epoch}")

    wall = wall_before + time.perf_counter() - started
    load_best_weights(model, run_dir)
    test_images, test_labels = test.images, test.labels
    if args.dry_run:
        test_images, test_labels = test.images[:1000], test.labels[:1000]
    errors = errors_of(model, test_images, device)
    per_class = {name: float(errors[test_labels.numpy() == k].mean()) for k, name in enumerate(test.label_names)
                 if (test_labels == k).any()}
    metrics = {"history": history, "best_epoch": best["epoch"], "best_val_mse": best["val_mse"],
               "test_mse_torch": float(errors.mean()), "test_mse_per_class_torch": per_class,
               "wall_seconds": wall, "seconds_per_epoch": wall / max(1, len(history))}
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    title = f"autoencoder ({config.get('preset') or 'custom'}), seed {config['seed']}"
    plot_curves(history, run_dir / "curves.png", title)
    save_reconstructions(model.cpu(), test, run_dir / "reconstructions.png",
                         f"{title}: test MSE {errors.mean():.5f}")
    print(f"done: best epoch {best['epoch']} val mse {best['val_mse']:.5f}; test mse {errors.mean():.5f}; {wall:.0f}s",
          flush=True)
    return run_dir


if __name__ == "__main__":
    main(parse_args())
