"""BentoML's model store as the hand-over point between export/ and the services (GUIDE's data flow).

    python -m service.model_store import models/     # what `make serve` runs; idempotent
    python -m service.model_store list

`import` copies each models/<name>/{model.onnx, card.json} into the store under the tag
`<name>:<first 16 hex digits of the model's SHA-256>`: importing the same bytes again is a no-op, new
bytes get a new version, and `<name>:latest` is the newest import. A model whose file does not match its
card is not imported. The services load the newest version of each name labelled `project=visionserve`
(or a plain folder when VISIONSERVE_MODELS_DIR is set), and verify the checksum again before loading.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

from .onnx_models import sha256_of_file

PROJECT_LABEL = "visionserve"
MODEL_FILES = ("model.onnx", "card.json")


def store_tag(card: dict) -> str:
    return f"{card['name']}:{card['sha256'][:16]}"


def import_model_folder(folder: Path) -> tuple[str, str]:
    """One models/<name>/ into the store; returns (tag, "imported" | "already in the store")."""
    card = json.loads((folder / "card.json").read_text())
    actual = sha256_of_file(folder / "model.onnx")
    if actual != card.get("sha256"):
        raise ValueError(f"{folder}/model.onnx has sha256 {actual}, its card says {card.get('sha256')}: not imported")
    tag = store_tag(card)
    try:
        bentoml.models.get(tag)
        return tag, "already in the store"
    except NotFound:
        pass
    labels = {"project": PROJECT_LABEL, "task": card["task"]}
    metadata = {"sha256": card["sha256"], "card_version": str(card.get("version")), "source": str(folder.resolve())}
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        for name in MODEL_FILES:
            shutil.copyfile(folder / name, Path(model.path) / name)
    return tag, "imported"


def latest_store_folders() -> list[Path]:
    """The newest store version of each visionserve model, as folders holding model.onnx and card.json."""
    newest: dict[str, object] = {}
    for model in bentoml.models.list():
        if model.info.labels.get("project") != PROJECT_LABEL:
            continue
        name = model.tag.name
        if name not in newest or model.creation_time > newest[name].creation_time:
            newest[name] = model
    return [Path(newest[name].path) for name in sorted(newest)]


def model_folders(models_dir: Path | None) -> list[Path]:
    """Where the services load models from: a folder's <name>/ subfolders, else the store's newest versions."""
    if models_dir is None:
        return latest_store_folders()
    return sorted(card.parent for card in models_dir.glob("*/card.json"))


def folders_to_serve(models_dir: Path | None) -> list[Path]:
    """`model_folders`, or a RuntimeError saying what to run when there is nothing to serve."""
    if models_dir is not None and not models_dir.is_dir():
        raise RuntimeError(f"VISIONSERVE_MODELS_DIR={models_dir} is not a folder: point it at a folder of exported "
                           "models (<name>/model.onnx + card.json), or unset it to serve BentoML's model store "
                           "(`python -m service.model_store import models`, as make serve does)")
    folders = model_folders(models_dir)
    if not folders:
        where = models_dir or "BentoML's model store"
        raise RuntimeError(f"no models in {where}: import them with `python -m service.model_store import models` "
                           "(make serve does), or point VISIONSERVE_MODELS_DIR at a folder of exported models")
    return folders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("import", help="import models/<name>/ folders").add_argument("models_dir", type=Path)
    commands.add_parser("list", help="the versions the services would load")
    args = p.parse_args(argv)
    if args.command == "list":
        for folder in latest_store_folders():
            card = json.loads((folder / "card.json").read_text())
            print(f"{store_tag(card)}  {card['task']}  {folder}")
        return 0
    folders = model_folders(args.models_dir)
    if not folders:
        print(f"no models/<name>/card.json under {args.models_dir}: export a model first (README, Export)",
              file=sys.stderr)
        return 1
    failed = False
    for folder in folders:
        try:
            tag, outcome = import_model_folder(folder)
            print(f"{tag}: {outcome}")
        except (OSError, ValueError, KeyError) as exc:
            print(f"{folder.name}: {exc}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
