"""What every training CLI shares: a run's settings from defaults, a preset and explicit flags, and the
shortest command line that reproduces them (recorded in the run and on the card)."""

from __future__ import annotations

import argparse


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
