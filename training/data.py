"""Datasets as in-memory uint8 tensors: IDX (MNIST format), CIFAR-10 python batches, sklearn digits.

Every loader returns a `Dataset` of uint8 images `[N, C, H, W]` and int64 labels `[N]`, plus the
SHA-256 of every file it read, so a training run can record exactly which bytes it learnt from.
The data sets here are small enough to hold in memory whole; batches are cut from tensors instead
of going through a per-sample DataLoader, whose worker processes would fight training for 2 cores.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

# The IDX reader needs only numpy (loadtests use it without torch); re-exported here for the trainers and tests.
from formats.idx import (FASHION_MNIST_DIR, FASHION_MNIST_LABELS, DataFormatError, find_idx,  # noqa: F401
                         open_maybe_gzip, read_idx, sha256_file)

CIFAR10_LABELS = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]
DIGITS_LABELS = [str(d) for d in range(10)]

@dataclass
class Dataset:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]
    label_names: list[str]
    name: str
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, index: torch.Tensor, name: str | None = None) -> "Dataset":
        return Dataset(self.images[index], self.labels[index], self.label_names, name or self.name, self.files)


def load_idx_split(directory: str | Path, split: str, label_names: list[str] | None = None,
                   name: str = "idx") -> Dataset:
    """Load the `train` or `t10k` split of an MNIST-format folder (MNIST, Fashion-MNIST, KMNIST...)."""
    directory = Path(directory)
    prefix = {"train": "train", "test": "t10k"}[split]
    image_path = find_idx(directory, f"{prefix}-images-idx3-ubyte")
    label_path = find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(image_path, expected_ndim=3)
    labels = read_idx(label_path, expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise DataFormatError(
            f"{image_path} holds {images.shape[0]} images but {label_path} holds {labels.shape[0]} labels"
        )
    if images.dtype != np.uint8:
        raise DataFormatError(f"{image_path}: expected unsigned bytes, found {images.dtype}")
    n_classes = int(labels.max()) + 1 if labels.size else 0
    names = label_names or [str(i) for i in range(n_classes)]
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        raise DataFormatError(f"{label_path}: labels outside 0..{len(names) - 1}")
    return Dataset(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        label_names=list(names),
        name=f"{name}:{split}",
        files={str(image_path): sha256_file(image_path), str(label_path): sha256_file(label_path)},
    )


def load_cifar10_split(directory: str | Path, split: str) -> Dataset:
    """Load CIFAR-10 "python version" batches (data_batch_1..5 or test_batch) as uint8 [N,3,32,32]."""
    directory = Path(directory)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels, files = [], [], {}
    for batch_name in names:
        path = directory / batch_name
        if not path.is_file():
            raise DataFormatError(f"{path}: no such file")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            batch_labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except (pickle.UnpicklingError, KeyError, EOFError, TypeError, ValueError) as exc:
            raise DataFormatError(f"{path}: not a CIFAR-10 python batch ({exc!r})") from exc
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != batch_labels.shape[0]:
            raise DataFormatError(f"{path}: data {data.shape} and labels {batch_labels.shape} do not match [N, 3072]")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
        files[str(path)] = sha256_file(path)
    return Dataset(
        images=torch.from_numpy(np.concatenate(images)),
        labels=torch.from_numpy(np.concatenate(labels)),
        label_names=list(CIFAR10_LABELS),
        name=f"cifar10:{split}",
        files=files,
    )


def load_digits_split(split: str, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (values 0..16), scaled to uint8 [N,1,8,8]; a fixed split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    index = order[:n_test] if split == "test" else order[n_test:]
    return Dataset(
        images=torch.from_numpy(images[index]).unsqueeze(1),
        labels=torch.from_numpy(labels[index]),
        label_names=list(DIGITS_LABELS),
        name=f"digits:{split}",
        files={"sklearn.datasets.load_digits": "bundled-with-scikit-learn"},
    )


def load_dataset(name: str, split: str, data_dir: str | Path | None = None) -> Dataset:
    """`split` is "train" or "test". `data_dir` overrides where an IDX or CIFAR set is read from."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if name == "fashion-mnist":
        directory = Path(data_dir) if data_dir else FASHION_MNIST_DIR
        if not directory.is_dir():
            raise DataFormatError(
                f"{directory}: Fashion-MNIST not found; install it with `apt-get install dataset-fashion-mnist` "
                "(or `make data`), or pass --data-dir to an MNIST-format folder"
            )
        return load_idx_split(directory, split, FASHION_MNIST_LABELS, name="fashion-mnist")
    if name == "idx":
        if data_dir is None:
            raise ValueError("--dataset idx needs --data-dir pointing to an MNIST-format folder")
        return load_idx_split(data_dir, split, None, name=f"idx:{Path(data_dir).name}")
    if name == "cifar10":
        if data_dir is None:
            raise ValueError("--dataset cifar10 needs --data-dir pointing to the cifar-10-batches-py folder")
        return load_cifar10_split(data_dir, split)
    if name == "digits":
        return load_digits_split(split)
    raise ValueError(f"unknown dataset {name!r}; choose fashion-mnist, idx, cifar10 or digits")


def train_val_split(dataset: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded split of the training set; the test split is never used for model selection."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)
    n_val = int(round(len(dataset) * val_fraction))
    return (dataset.subset(order[n_val:], dataset.name + "[train]"),
            dataset.subset(order[:n_val], dataset.name + "[val]"))


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images on the [0, 1] scale (for in-graph normalisation)."""
    x = images.float().div_(255.0)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def normalise(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [N,C,H,W] -> float32 standardised. The exported graph runs exactly this on raw pixels."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s
