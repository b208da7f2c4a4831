"""What every exporter and evaluator shares: the dynamo exporter into one self-contained file, the checker,
onnxruntime sessions for parity checks (and checksum-verified ones of released models), the models/ folders of a
task, the flags every exporter and evaluator takes, the file's checksum and the card beside it."""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch


class ParityError(RuntimeError):
    """The exported graph does not reproduce PyTorch closely enough; nothing is written."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_to_bytes(module: torch.nn.Module, example_inputs: tuple, input_names: list[str], output_names: list[str],
                    dynamic_shapes: dict) -> bytes:
    """Export with the dynamo exporter (the legacy one cannot export MaxUnpool2d) and return one
    self-contained ONNX file: weights inline (external_data=False) so the card's checksum covers them."""
    module.eval()
    with torch.no_grad():
        program = torch.onnx.export(module, example_inputs, dynamo=True, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes,
                                    external_data=False, optimize=True)
    model_proto = program.model_proto
    onnx.checker.check_model(model_proto, full_check=True)
    return model_proto.SerializeToString()


def cpu_session(model_bytes: bytes) -> ort.InferenceSession:
    """A CPU session: parity and metrics are measured on the provider every machine has."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def model_dirs_for(models: str | Path, task: str) -> list[Path]:
    """The models/<name>/ folders whose card.json names `task` (classification, segmentation, ...), by name."""
    return sorted(card.parent for card in Path(models).glob("*/card.json")
                  if json.loads(card.read_text()).get("task") == task)


def verified_session(model_dir: Path) -> tuple[ort.InferenceSession, dict]:
    """A CPU session of model_dir/model.onnx after checking its SHA-256 against the card beside it."""
    card = json.loads((model_dir / "card.json").read_text())
    model_bytes = (model_dir / "model.onnx").read_bytes()
    if sha256_bytes(model_bytes) != card["sha256"]:
        raise SystemExit(f"{model_dir}/model.onnx does not match the sha256 in its card.json")
    return cpu_session(model_bytes), card


def run_batched(session: ort.InferenceSession, feeds: dict[str, np.ndarray], batch_size: int = 1000) -> list[np.ndarray]:
    """Run `session` over arrays whose first axis is the batch, in chunks; outputs concatenated."""
    n = next(iter(feeds.values())).shape[0]
    chunks = [session.run(None, {k: v[i:i + batch_size] for k, v in feeds.items()}) for i in range(0, n, batch_size)]
    return [np.concatenate([c[j] for c in chunks]) for j in range(len(chunks[0]))]


def runtime_versions() -> dict:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "python": platform.python_version()}


def opset_of(model_bytes: bytes) -> int:
    model = onnx.load_from_string(model_bytes)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def export_block(opset: int) -> dict:
    """A card's "export" section: how the graph was written and the versions that wrote it."""
    return {"exporter": "torch.onnx.export(dynamo=True, external_data=False)", "opset": opset, **runtime_versions()}


def add_export_flags(p: argparse.ArgumentParser, trainer: str) -> None:
    """--run, --name and --out of every exporter (the classifier's --run takes several runs: an ensemble)."""
    p.add_argument("--run", required=True, help=f"a run folder written by {trainer}")
    p.add_argument("--name", required=True, help="model name; written to OUT/NAME/")
    p.add_argument("--out", default="models")


def add_evaluation_flags(p: argparse.ArgumentParser) -> None:
    """--models, --out and --data-dir of every evaluator of released models."""
    p.add_argument("--models", default="models")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--data-dir", help="MNIST-format folder instead of the default Fashion-MNIST location")


def with_command(args: argparse.Namespace, argv: list[str] | None) -> argparse.Namespace:
    """Keep the words an exporter was run with, so that its card can say the exact command."""
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def export_command(module: str, args: argparse.Namespace) -> str:
    return f"python -m {module} {shlex.join(args.argv)}".strip()


def write_model(out_dir: Path, model_bytes: bytes, card: dict) -> Path:
    """Write model.onnx and card.json; the card carries the file's SHA-256, checked by the server on load."""
    out_dir.mkdir(parents=True, exist_ok=True)
    digest = sha256_bytes(model_bytes)
    card = dict(card)
    card["sha256"] = digest
    card["file_bytes"] = len(model_bytes)
    card["version"] = f"{datetime.now(timezone.utc):%Y.%m.%d}+{digest[:8]}"
    card["exported_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    (out_dir / "model.onnx").write_bytes(model_bytes)
    (out_dir / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out_dir / "model.onnx"


def write_unless_dry_run(args: argparse.Namespace, model_bytes: bytes, card: dict) -> Path | None:
    """An exporter's last step: OUT/NAME/{model.onnx, card.json} (the folder is returned), or on --dry-run
    nothing written and None."""
    if args.dry_run:
        return None
    out_dir = Path(args.out) / args.name
    write_model(out_dir, model_bytes, card)
    return out_dir
