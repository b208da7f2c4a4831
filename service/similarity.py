"""The feature files a classifier's card names (card["features"]: the similarity index, the OOD statistics), checked
before the server starts, and the similarity index with its reference images, loaded once per worker.

A card's `features.<name>.file` lies beside model.onnx (in BentoML's store, copied there by
`python -m service.model_store import`), with its sha256 in the same section. A file that is missing or whose bytes
differ stops `bentoml serve` before any worker starts (check_feature_files, called from service/app.py), with a
message that names the file and both checksums: a server must not answer neighbours from an index that is not the
one its card measured. The reference images (thumbnails and labels of the 60,000 training images) are read from
the IDX files the index's card section names, in VISIONSERVE_REFERENCE_DIR (default
/usr/share/datasets/fashion-mnist), also by sha256: a mismatch stops the server too; missing files only make
/similar unavailable for that model (a container without the data set still classifies).
"""

from __future__ import annotations

import base64
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from formats.idx import read_idx

from .images import png_bytes
from .onnx_models import ModelToServe, sha256_of_file

logger = logging.getLogger("bentoml.visionserve")
DEFAULT_REFERENCE_DIR = Path("/usr/share/datasets/fashion-mnist")
REFERENCE_DIR_VARIABLE = "VISIONSERVE_REFERENCE_DIR"


def reference_dir(environ=os.environ) -> Path:
    return Path(environ.get(REFERENCE_DIR_VARIABLE) or DEFAULT_REFERENCE_DIR)


def feature_sections(card: dict | None) -> dict[str, dict]:
    """The card's feature sections that name a file: {"similarity": {...}, "ood": {...}}."""
    return {name: section for name, section in ((card or {}).get("features") or {}).items()
            if isinstance(section, dict) and section.get("file")}


def feature_file_problems(folder: Path, card: dict | None) -> list[str]:
    """What is wrong with the feature files of one model folder: missing, or bytes that are not the card's."""
    problems = []
    for name, section in feature_sections(card).items():
        path = folder / section["file"]
        if not path.is_file():
            problems.append(f"{card.get('name')}: {name} file {path} is missing (the card names it; import the model "
                            "again: python -m service.model_store import models)")
            continue
        actual = sha256_of_file(path)
        if actual != section.get("sha256"):
            problems.append(f"{card.get('name')}: {name} file {path} has sha256 {actual}, its card says "
                            f"{section.get('sha256')}; rebuild it with `{section.get('command', 'make index')}` or "
                            "restore the file")
    return problems


def reference_file_problems(card: dict | None, directory: Path) -> tuple[list[str], list[str]]:
    """(mismatched, missing) reference IDX files of the card's similarity section."""
    section = feature_sections(card).get("similarity")
    mismatched, missing = [], []
    for name, expected in ((section or {}).get("reference_set", {}).get("files") or {}).items():
        path = directory / name
        if not path.is_file():
            missing.append(str(path))
        elif sha256_of_file(path) != expected:
            mismatched.append(f"{card.get('name')}: reference images {path} have sha256 {sha256_of_file(path)}, the "
                              f"index was built from {expected}")
    return mismatched, missing


def check_feature_files(models: list[ModelToServe], directory: Path | None = None) -> None:
    """Raise one RuntimeError naming every feature file (and reference file) whose checksum is not its card's."""
    directory = directory or reference_dir()
    problems = []
    for model in models:
        problems += feature_file_problems(model.folder, model.card)
        problems += reference_file_problems(model.card, directory)[0]
    if problems:
        raise RuntimeError("refusing to start: " + "; ".join(problems))


def verified_feature_sections(entries, name: str, what: str):
    """(entry, its card's `name` feature section) of every available model whose file has its card's checksum.

    Checked before serving too (check_feature_files); a worker that finds a file changed since serves without it,
    never half-trusting it."""
    for entry in entries:
        section = feature_sections(entry.card).get(name)
        if section is None or not entry.available:
            continue
        problems = feature_file_problems(entry.folder, entry.card)
        if problems:
            logger.error("%s of %s not loaded: %s", what, entry.name, "; ".join(problems))
            continue
        yield entry, section


@dataclass
class SimilarityIndex:
    """One classifier's faiss index over its reference set, and that set's images and labels."""

    model: str
    index: object  # faiss.Index
    images: np.ndarray | None  # uint8 [N, H, W], None when the reference files are missing
    labels: np.ndarray | None
    label_names: list[str]
    section: dict
    unavailable_reason: str | None = None
    thumbnail_cache: dict[int, str] = field(default_factory=dict)

    def search(self, embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 [Q, D] -> (euclidean distances [Q, k], reference indices [Q, k]), nearest first."""
        squared, indices = self.index.search(np.ascontiguousarray(embeddings, np.float32), k)
        return np.sqrt(np.maximum(squared, 0.0)), indices

    def thumbnail(self, position: int) -> str:
        png = self.thumbnail_cache.get(position)
        if png is None:
            png = base64.b64encode(png_bytes(self.images[position])).decode("ascii")
            if len(self.thumbnail_cache) < 100_000:
                self.thumbnail_cache[position] = png
        return png


def load_similarity_indexes(entries, directory: Path | None = None, threads: int = 1) -> dict[str, SimilarityIndex]:
    """The index of every available classifier whose card has one; start-up only (never at request time)."""
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    directory = directory or reference_dir()
    indexes = {}
    for entry, section in verified_feature_sections(entries, "similarity", "similarity index"):
        index = faiss.read_index(str(entry.folder / section["file"]))
        mismatched, missing = reference_file_problems(entry.card, directory)
        images = labels = None
        reason = None
        if mismatched or missing:
            reason = "; ".join(mismatched) or (f"the reference images are missing ({', '.join(missing)}); set "
                                               f"{REFERENCE_DIR_VARIABLE} to the Fashion-MNIST folder")
            logger.error("similarity index of %s loaded without its reference images: %s", entry.name, reason)
        else:
            files = sorted(section["reference_set"]["files"])
            images = read_idx(directory / next(name for name in files if "images" in name))
            labels = read_idx(directory / next(name for name in files if "labels" in name))
            if len(images) != index.ntotal or len(labels) != index.ntotal:
                reason = f"the index holds {index.ntotal} vectors, the reference files {len(images)} images"
                images = labels = None
        indexes[entry.name] = SimilarityIndex(entry.name, index, images, labels, list(entry.card["labels"]), section,
                                              reason)
        logger.info("similarity index of %s loaded: %d vectors of %d dimensions, sha256 verified (%s)%s", entry.name,
                    index.ntotal, index.d, section["sha256"], f"; unavailable: {reason}" if reason else "")
    return indexes
