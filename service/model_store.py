"""BentoML's model store as the hand-over point between export/ and the service (docs/ARCHITECTURE.md, the data
flow), and the one rule for which models a server serves.

    python -m service.model_store import models/        # what `make serve` runs; idempotent
    python -m service.model_store list                  # what a server started here would serve
    python -m service.model_store build-bento models/   # what `make bento` runs: a bento pinning the cards' tags

`import` copies each models/<name>/{model.onnx, card.json} into the store under the tag
`<name>:<first 16 hex digits of the model's SHA-256>`: importing the same bytes again is a no-op, new
bytes get a new version. A model whose file does not match its card is not imported, nor is a card whose tag
the store already holds with other bytes.

**The served set is named, never discovered** (docs/SERVING.md, "Which models are served"): a server serves
the models the checkout's models/*/card.json name, each looked up in the store by its own tag, and loads one
only when the stored file's SHA-256 is the card's. A model in the store that no card names is not served, and
`<name>:latest` (the newest import, which may come from another checkout) decides nothing. A deployment may
name the models instead by store tags (VISIONSERVE_MODELS), by another folder of cards (VISIONSERVE_CARDS_DIR)
or by a plain folder of exported models outside the store (VISIONSERVE_MODELS_DIR); inside a bento, by the
tags its bento.yaml pins.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import bentoml
import yaml
from bentoml.exceptions import BentoMLException, NotFound

from .config import ModelSelection
from .onnx_models import ModelToServe, sha256_of_file
from .similarity import feature_sections

PROJECT_LABEL = "visionserve"
MODEL_FILES = ("model.onnx", "card.json")
IMPORT_HINT = "import it with `python -m service.model_store import models` (make serve does)"


def store_tag(card: dict) -> str:
    return f"{card['name']}:{card['sha256'][:16]}"


def store_location() -> str:
    # For messages only: BentoML keeps its models under $BENTOML_HOME/models.
    return str(Path(os.environ.get("BENTOML_HOME", "~/bentoml")).expanduser() / "models")


def import_model_folder(folder: Path) -> tuple[str, str]:
    """One models/<name>/ into the store; returns (tag, "imported" | "already in the store")."""
    card = json.loads((folder / "card.json").read_text())
    actual = sha256_of_file(folder / "model.onnx")
    if actual != card.get("sha256"):
        raise ValueError(f"{folder}/model.onnx has sha256 {actual}, its card says {card.get('sha256')}: not imported")
    tag = store_tag(card)
    try:
        stored = bentoml.models.get(tag)
    except NotFound:
        stored = None
    if stored is not None:
        # The tag is the card's checksum: a stored file with other bytes was changed after its import.
        stored_sha256 = sha256_of_file(Path(stored.path) / "model.onnx")
        if stored_sha256 != card["sha256"]:
            raise ValueError(f"{tag} in the store has sha256 {stored_sha256}, its card says {card['sha256']}: "
                             f"refused; remove it (`bentoml models delete {tag}`) and import again")
        if refresh_card_and_features(folder, Path(stored.path), card):
            return tag, "already in the store; card and feature files refreshed"
        return tag, "already in the store"
    labels = {"project": PROJECT_LABEL, "task": card["task"]}
    metadata = {"sha256": card["sha256"], "card_version": str(card.get("version")), "source": str(folder.resolve())}
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        for name in MODEL_FILES + feature_files(card):
            shutil.copyfile(folder / name, Path(model.path) / name)
    return tag, "imported"


def feature_files(card: dict) -> tuple[str, ...]:
    """The files a card's `features` sections name (similarity index, OOD statistics; service/similarity.py)."""
    return tuple(section["file"] for section in feature_sections(card).values())


def refresh_card_and_features(folder: Path, stored: Path, card: dict) -> bool:
    """Same model bytes, a newer card (e.g. `make index` added a feature section): the stored card and feature
    files follow the checkout's, whose checksums the server verifies before it starts."""
    changed = False
    for name in ("card.json",) + feature_files(card):
        if not (stored / name).is_file() or sha256_of_file(stored / name) != sha256_of_file(folder / name):
            shutil.copyfile(folder / name, stored / name)
            changed = True
    return changed


def default_cards_dir() -> Path:
    # The checkout this service package lies in: `make serve`, the tests and a bare `bentoml serve` from the
    # repository root all mean its models/, wherever they are started from.
    return Path(__file__).resolve().parent.parent / "models"


def bento_yaml_of_this_service() -> Path | None:
    """The bento.yaml of the bento this code runs from, if any: BentoML puts a bento's code under <bento>/src/."""
    code_root = Path(__file__).resolve().parent.parent
    bento_yaml = code_root.parent / "bento.yaml"
    return bento_yaml if code_root.name == "src" and bento_yaml.is_file() else None


def card_files(cards_dir: Path) -> list[Path]:
    return sorted(cards_dir.glob("*/card.json"))


def read_card(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RuntimeError(f"{path} cannot be read ({exc}): fix or remove it, it names a model to serve") from exc


def stored_model(tag: str, named_by: Path | str) -> bentoml.Model:
    """The store's model of exactly this tag (a version prefix must match one version), or a one-line error."""
    try:
        model = bentoml.models.get(tag)
    except NotFound:
        raise RuntimeError(f"{named_by} names {tag}, which is not in BentoML's model store ({store_location()}): "
                           f"{IMPORT_HINT}") from None
    except BentoMLException as exc:  # a version prefix shared by several versions
        raise RuntimeError(f"{named_by} names {tag}: {exc}; give more of the version") from None
    if model.info.labels.get("project") != PROJECT_LABEL or not (Path(model.path) / "card.json").is_file():
        raise RuntimeError(f"{named_by} names {model.tag}, which is not a visionserve model "
                           f"(no label project={PROJECT_LABEL} or no card.json)")
    return model


def served_from_cards(cards_dir: Path) -> list[ModelToServe]:
    """Each card's own tag in the store; the checkout's card is what is served, the store supplies its bytes."""
    if not cards_dir.is_dir():
        raise RuntimeError(f"{cards_dir} is not a folder of model cards (<name>/card.json): export models into "
                           "models/ first (README, Export), or set VISIONSERVE_CARDS_DIR")
    served = []
    for card_path in card_files(cards_dir):
        card = read_card(card_path)
        model = stored_model(store_tag(card), card_path)
        served.append(ModelToServe(Path(model.path), card, str(model.tag), "checkout card", card_path))
    return served


def served_from_tags(tags: list[str], named_by: Path | str, source: str) -> list[ModelToServe]:
    """Store tags: the card imported with each is what is served, and it must be the card of that tag."""
    served = []
    for tag in tags:
        model = stored_model(tag, named_by)
        card = read_card(Path(model.path) / "card.json")
        if store_tag(card) != str(model.tag):
            raise RuntimeError(f"{named_by} names {model.tag}, whose stored card says sha256 {card.get('sha256')}: "
                               "the store was changed after the import; import the model again")
        served.append(ModelToServe(Path(model.path), card, str(model.tag), source, named_by))
    return served


def served_from_folder(models_dir: Path) -> list[ModelToServe]:
    """A plain folder of exported models, outside the store (development, tests, benchmarks)."""
    if not models_dir.is_dir():
        raise RuntimeError(f"VISIONSERVE_MODELS_DIR={models_dir} is not a folder: point it at a folder of exported "
                           "models (<name>/model.onnx + card.json), or unset it to serve the checkout's cards from "
                           "BentoML's model store (`python -m service.model_store import models`, as make serve does)")
    served = []
    for card_path in card_files(models_dir):
        try:
            card = json.loads(card_path.read_text())
        except (OSError, json.JSONDecodeError):
            card = None  # listed unavailable, the others still serve (onnx_models.entries_of_task)
        served.append(ModelToServe(card_path.parent, card, None, "folder", card_path))
    return served


def tags_of_bento(bento_yaml: Path) -> list[str]:
    return [str(entry["tag"]) for entry in yaml.safe_load(bento_yaml.read_text()).get("models") or []]


def models_to_serve(selection: ModelSelection) -> list[ModelToServe]:
    """The models the deployment names, resolved; a RuntimeError of one line when it names nothing, or names
    something the store does not hold. Checksums are verified when each model is loaded (onnx_models)."""
    bento_yaml = bento_yaml_of_this_service()
    if selection.models_dir is not None:
        served, where = served_from_folder(selection.models_dir), str(selection.models_dir)
    elif selection.tags:
        served, where = served_from_tags(list(selection.tags), "VISIONSERVE_MODELS", "tag list"), "VISIONSERVE_MODELS"
    elif selection.cards_dir is None and bento_yaml is not None:
        served, where = served_from_tags(tags_of_bento(bento_yaml), bento_yaml, "bento"), str(bento_yaml)
    else:
        cards_dir = selection.cards_dir or default_cards_dir()
        served, where = served_from_cards(cards_dir), f"{cards_dir}/*/card.json"
    if not served:
        raise RuntimeError(f"no models in {where}: export models into models/ and import them with "
                           "`python -m service.model_store import models` (make serve does), or point "
                           "VISIONSERVE_MODELS_DIR at a folder of exported models")
    names = [model.card.get("name") for model in served if model.card is not None]
    if len(names) != len(set(names)):
        raise RuntimeError(f"{where} names the model {max(names, key=names.count)} twice: serve one version of it")
    return served


def generated_bentofile(template: Path, tags: list[str]) -> str:
    """bentofile.yaml with `models` set to exactly these tags (the committed file lists none, so no `latest`)."""
    config = yaml.safe_load(template.read_text())
    config["models"] = tags
    return (f"# Generated by `python -m service.model_store build-bento` (make bento) from {template.name} and the "
            "cards' tags.\n" + yaml.safe_dump(config, sort_keys=False))


def build_bento(cards_dir: Path, template: Path) -> int:
    """`bentoml build` of the service pinned to the tags of cards_dir's cards, each checked to be in the store."""
    tags = [str(model.tag) for model in served_from_tags([store_tag(read_card(path)) for path in card_files(cards_dir)],
                                                         cards_dir, "bento")]
    if not tags:
        print(f"no models/<name>/card.json under {cards_dir}: export a model first (README, Export)", file=sys.stderr)
        return 1
    build_ctx = template.resolve().parent
    with tempfile.TemporaryDirectory(prefix="visionserve-bento-") as scratch:
        bentofile = Path(scratch) / "bentofile.yaml"
        bentofile.write_text(generated_bentofile(template, tags))
        print(f"bento models: {', '.join(tags)}", file=sys.stderr)
        return subprocess.run([sys.executable, "-m", "bentoml", "build", "-f", str(bentofile), str(build_ctx)]).returncode


def print_served(selection: ModelSelection) -> None:
    for model in models_to_serve(selection):
        card = model.card or {}
        print(f"{model.tag or '-'}  {card.get('task')}  {model.source}: {model.named_by}")


def import_folders(models_dir: Path) -> int:
    folders = [path.parent for path in card_files(models_dir)]
    if not folders:
        print(f"no models/<name>/card.json under {models_dir}: export a model first (README, Export)", file=sys.stderr)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("import", help="import models/<name>/ folders").add_argument("models_dir", type=Path)
    commands.add_parser("list", help="the models a server started with this environment would serve")
    build = commands.add_parser("build-bento", help="bentoml build, pinned to the tags of these cards")
    build.add_argument("cards_dir", type=Path)
    build.add_argument("--bentofile", type=Path, default=Path("bentofile.yaml"), help="the template (no models)")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            print_served(ModelSelection.from_environ())
            return 0
        if args.command == "build-bento":
            return build_bento(args.cards_dir, args.bentofile)
    except (RuntimeError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 1
    return import_folders(args.models_dir)


if __name__ == "__main__":
    sys.exit(main())
