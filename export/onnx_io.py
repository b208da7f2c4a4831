"""What every export shares: the dynamo exporter into one self-contained file, the checker, onnxruntime
sessions for parity checks, the file's checksum and the card beside it."""

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
