"""Data loaders on small files the tests write: IDX (raw and gzipped), CIFAR-10 batches, digits, splits."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from training.data import (DataFormatError, load_cifar10_split, load_dataset, load_idx_split, read_idx,
                           sha256_file, train_val_split)


def write_idx(path, array: np.ndarray, type_code: int = 0x08, compress: bool = False) -> None:
    header = struct.pack(">HBB", 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def make_idx_folder(folder, n_train=12, n_test=5, compress=False):
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  compress=compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n, dtype=np.uint8),
                  compress=compress)
    return folder


@pytest.mark.parametrize("compress", [False, True])
def test_idx_roundtrip(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("x.gz" if compress else "x")
    write_idx(path, images, compress=compress)
    np.testing.assert_array_equal(read_idx(path), images)


def test_idx_other_dtype(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 0.0]], dtype=np.float32)
    write_idx(tmp_path / "f", values, type_code=0x0D)
    np.testing.assert_array_equal(read_idx(tmp_path / "f"), values)


def test_idx_truncated_names_file(tmp_path):
    path = tmp_path / "short-idx3-ubyte"
    write_idx(path, np.zeros((4, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataFormatError, match="short-idx3-ubyte.*holds 3126 bytes"):
        read_idx(path)


def test_idx_truncated_gzip(tmp_path):
    path = tmp_path / "t.gz"
    write_idx(path, np.zeros((4, 28, 28), np.uint8), compress=True)
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DataFormatError, match="t.gz"):
        read_idx(path)


@pytest.mark.parametrize("magic", [b"\x00\x00\x07\x03", b"\x01\x00\x08\x03", b"PK\x03\x04", b"\x00\x00\x08\x00"])
def test_idx_bad_magic(tmp_path, magic):
    path = tmp_path / "bad"
    path.write_bytes(magic + b"\x00" * 64)
    with pytest.raises(DataFormatError, match="bad IDX magic"):
        read_idx(path)


def test_idx_wrong_rank(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, np.zeros(5, np.uint8))
    with pytest.raises(DataFormatError, match="expected 3 dimensions"):
        read_idx(path, expected_ndim=3)


def test_idx_split_count_mismatch(tmp_path):
    make_idx_folder(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))  # 5 images, 4 labels
    with pytest.raises(DataFormatError, match="holds 5 images but .* holds 4 labels"):
        load_idx_split(tmp_path, "test")


def test_idx_folder_loads_as_dataset(tmp_path):
    make_idx_folder(tmp_path, compress=True)
    data = load_dataset("idx", "train", data_dir=tmp_path)
    assert data.images.shape == (12, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and len(data) == 12
    assert set(data.files.values()) == {sha256_file(p) for p in data.files}


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataFormatError, match="train-images-idx3-ubyte"):
        load_idx_split(tmp_path, "train")


def test_cifar10_batches(tmp_path):
    rng = np.random.default_rng(1)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 3).tolist()
        with open(tmp_path / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
        expected.append((data, labels))
    train = load_cifar10_split(tmp_path, "train")
    test = load_dataset("cifar10", "test", data_dir=tmp_path)
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    # Rows are stored channel-major: the first 1024 bytes are the red plane.
    np.testing.assert_array_equal(test.images[0, 0].numpy().ravel(), expected[-1][0][0, :1024])
    assert test.labels.tolist() == expected[-1][1]
    assert train.label_names[0] == "airplane"


def test_cifar10_corrupt_batch(tmp_path):
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataFormatError, match="test_batch"):
        load_cifar10_split(tmp_path, "test")


def test_digits_and_split():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape[1:] == (1, 8, 8) and int(train.images.max()) == 255
    assert len(train) + len(test) == 1797
    a_train, a_val = train_val_split(train, 0.1, seed=3)
    b_train, b_val = train_val_split(train, 0.1, seed=3)
    assert torch.equal(a_val.labels, b_val.labels) and torch.equal(a_train.images, b_train.images)
    assert len(a_train) + len(a_val) == len(train)
    _, c_val = train_val_split(train, 0.1, seed=4)
    assert not torch.equal(a_val.images, c_val.images)
