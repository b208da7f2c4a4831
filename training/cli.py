"""What every training CLI shares: the flags of a run's life (seed, device, where it goes, resume, dry run), a
run's settings from defaults, a preset and explicit flags, and the shortest command line that reproduces them
(recorded in the run and on the card)."""

from __future__ import annotations

import argparse


def add_recipe_flags(p: argparse.ArgumentParser, presets: dict, data_dir_help: str,
                     datasets: list[str] | None = None) -> None:
    """--preset, --dataset (where the trainer reads more than one), --data-dir, --epochs, --batch-size."""
    p.add_argument("--preset", choices=sorted(presets), help="a named recipe; explicit flags override it")
    if datasets:
        p.add_argument("--dataset", choices=datasets)
    p.add_argument("--data-dir", help=data_dir_help)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)


def add_optimiser_flags(p: argparse.ArgumentParser) -> None:
    """The settings training.common.make_optimizer and make_scheduler read."""
    p.add_argument("--optimizer", choices=["sgd", "rmsprop", "adam", "adamw"])
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["constant", "cosine", "onecycle"])
    p.add_argument("--warmup-epochs", type=int, help="linear warm-up before a cosine schedule")


def add_precision_flags(p: argparse.ArgumentParser, channels_last_help: str) -> None:
    """--amp and --channels-last, what training.common.training_setup reads."""
    p.add_argument("--amp", choices=["auto", "bf16", "off"],
                   help="bf16 autocast for training (auto: where the CPU has bf16 or on CUDA)")
    p.add_argument("--channels-last", choices=["on", "off"], help=channels_last_help)


def add_run_flags(p: argparse.ArgumentParser, runs_of: str, stop_after: bool = True,
                  resume_help: str = "a run folder whose last.pt to continue from",
                  dry_run_help: str = "two batches per epoch, to check the plumbing") -> None:
    """--seed, --device, --out, --resume, --stop-after (where the trainer can stop), --dry-run, --no-progress."""
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default="runs", help=f"runs are written to OUT/{runs_of}/<stamp>/")
    p.add_argument("--resume", help=resume_help)
    if stop_after:
        p.add_argument("--stop-after", type=int, help="stop after this many epochs of this invocation (fit a time "
                       "slot); --resume continues where it stopped")
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")


def resolve_config(args: argparse.Namespace, defaults: dict, presets: dict) -> dict:
    """Defaults, overridden by the preset, overridden by every flag given explicitly."""
    config = dict(defaults)
    if args.preset:
        config.update(presets[args.preset])
    config.update({k: v for k, v in vars(args).items() if k in defaults and v is not None})
    config["preset"] = args.preset
    return config


def command_for(config: dict, defaults: dict, presets: dict, module: str) -> str:
    """The shortest command line that reproduces `config`: its preset plus every setting that differs."""
    base = dict(defaults) | presets.get(config.get("preset") or "", {})
    words = [f"python -m {module}"] + ([f"--preset {config['preset']}"] if config.get("preset") else [])
    for key, value in config.items():
        if key in defaults and key != "seed" and value != base[key] and value is not None:
            flag = f"--{key.replace('_', '-')}"
            if value is True:
                words.append(flag)
            else:
                words.append(f"{flag} {' '.join(str(v) for v in value) if isinstance(value, list) else value}")
    return " ".join(words + [f"--seed {config['seed']}"])
