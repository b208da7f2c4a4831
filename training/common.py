"""What every trainer shares: the device, the run folder and its config.json, optimisers and schedules, the
batch augmentations, bf16 and channels_last choices, and the stop/resume bookkeeping of the epoch loop.

The trainers are training/train_classifier.py, train_segnet.py, train_autoencoder.py and train_dcgan.py; each
keeps its own loop, since what an epoch does differs (one loss, pixels, reconstructions, two networks).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F


# --- devices and run folders -------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def new_run_dir(out: str, model: str, seed: int) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out) / model / f"{stamp}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir



def start_or_resume(args, resolve_config) -> tuple[dict, dict | None]:
    """The run's settings and, with --resume, the last.pt it continues from (whose recorded settings win)."""
    if args.resume:
        state = torch.load(Path(args.resume) / "last.pt", map_location="cpu", weights_only=False)
        return state["config"], state
    return resolve_config(args), None


def load_best_weights(model: torch.nn.Module, run_dir: Path) -> None:
    """The weights of the run's best.pt (the epoch chosen on validation) into `model`, before the test split."""
    model.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu", weights_only=False)["model"])


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's batches, noise and augmentations: a resumed run draws exactly what an
    uninterrupted one would."""
    return seed * 1000 + epoch


def stops_here(stop_after: int | None, epoch: int, start_epoch: int, epochs: int, run_dir: Path) -> bool:
    """--stop-after: this invocation has trained its share of epochs and the run is not finished (says so)."""
    if stop_after and epoch - start_epoch + 1 >= stop_after and epoch < epochs:
        print(f"stopped after epoch {epoch}; continue with --resume {run_dir}", flush=True)
        return True
    return False


# --- the run record (config.json) and the hardware it names -----------------------------------------
def write_run_record(run_dir: Path, record: dict, first_epoch: int) -> dict:
    """Write config.json. A run resumed elsewhere (another machine, bf16 on or off) keeps where each stretch of
    epochs ran under "sessions": [{first_epoch, hardware, bf16_autocast, channels_last}], oldest first; the
    top-level "hardware" is the latest. Returns the record as written."""
    path = run_dir / "config.json"
    sessions = []
    if first_epoch > 1 and path.exists():
        previous = json.loads(path.read_text())
        sessions = previous.get("sessions") or [session_of(previous, 1)]
    sessions = [s for s in sessions if s["first_epoch"] < first_epoch] + [session_of(record, first_epoch)]
    record = record | {"sessions": sessions}
    path.write_text(json.dumps(record, indent=2))
    return record


def session_of(record: dict, first_epoch: int) -> dict:
    return {"first_epoch": first_epoch, "hardware": record.get("hardware"),
            "bf16_autocast": record.get("bf16_autocast"), "channels_last": record.get("channels_last")}


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA {torch.cuda.get_device_name(device)}"
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"



# --- precision and memory format ---------------------------------------------------------------
def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def uses_channels_last(config: dict, use_bf16: bool) -> bool:
    """NHWC memory format for conv nets. Runs recorded before --channels-last existed used it with bf16 only,
    and keep doing so on --resume so that they continue exactly."""
    if config["model"] == "mlp":
        return False
    if config.get("channels_last") is None:
        return use_bf16
    return config["channels_last"] == "on"


# --- augmentation on uint8 batches ------------------------------------------------------------------
def augment_batch(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (zero padding), horizontal flips, random erasing (p=0.5).

    Flips keep Fashion-MNIST labels (garments are left-right symmetric); shifts model imperfect
    centring; erasing (Zhong et al. 2017) makes the net use the whole item, not one telltale patch.
    """
    if kind == "none":
        return images
    n, _, h, w = images.shape
    out = images.clone()
    if "shift" in kind:
        pad = 2
        padded = F.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1).expand(n, images.shape[1], h, w + 2 * pad)
        cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w).expand(n, images.shape[1], h, w)
        out = padded.gather(2, rows).gather(3, cols)
    if "flip" in kind:
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(-1)
    if "erase" in kind:
        erase = (torch.rand(n, generator=generator) < 0.5).nonzero().flatten().tolist()
        for i in erase:
            eh = int(torch.randint(h // 8, h // 2 + 1, (1,), generator=generator))
            ew = int(torch.randint(w // 8, w // 2 + 1, (1,), generator=generator))
            y0 = int(torch.randint(0, h - eh + 1, (1,), generator=generator))
            x0 = int(torch.randint(0, w - ew + 1, (1,), generator=generator))
            out[i, :, y0:y0 + eh, x0:x0 + ew] = torch.randint(
                0, 256, (out.shape[1], eh, ew), generator=generator, dtype=torch.uint8)
    return out


# --- optimisation -----------------------------------------------------------------------------------
def make_optimizer(config: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    # Weight decay on weights only: decaying batch-norm scales and biases only fights the normalisation.
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    lr, name = config["lr"], config["optimizer"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config["momentum"], nesterov=config["momentum"] > 0)
    if name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(config: dict, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = config["epochs"] * steps_per_epoch
    if config["schedule"] == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config["lr"], total_steps=total)
    if config["schedule"] == "cosine":
        warmup = config["warmup_epochs"] * steps_per_epoch

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


@dataclass
class TrainSetup:
    """What a step of a single-network trainer needs: the model, its optimiser and schedule, and how it runs."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    device: torch.device
    mean: list[float]
    std: list[float]
    use_bf16: bool
    channels_last: bool



def training_setup(config: dict, model: torch.nn.Module, device: torch.device, mean: list[float],
                   std: list[float], steps_per_epoch: int) -> TrainSetup:
    """`model` on `device` in the memory format and precision `config` asks for, with its optimiser and schedule."""
    use_bf16 = config["amp"] == "bf16" or (config["amp"] == "auto" and (device.type == "cuda" or cpu_has_bf16()))
    channels_last = uses_channels_last(config, use_bf16)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, steps_per_epoch)
    return TrainSetup(model, optimizer, scheduler, device, mean, std, use_bf16, channels_last)
