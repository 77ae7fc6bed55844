"""Readers of the canonical dataset files, written tiny into a temporary folder."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest

from engine.data import datasets
from engine.data.datasets import load_dataset, resolve_data_dir
from engine.errors import DatasetError, UsageError


def write_cifar_batch(path, images, labels, label_key=b"labels"):
    """Write a batch the way the official python version stores it (pickle of bytes keys)."""
    batch = {b"batch_label": b"test", b"data": images.reshape(len(images), -1), label_key: list(labels),
             b"filenames": [b"x.png"] * len(labels)}
    path.write_bytes(pickle.dumps(batch, protocol=2))


def make_cifar10(root, n=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    arrays = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        write_cifar_batch(folder / name, images, labels)
        arrays.append((images, labels))
    return arrays


def make_cifar100(root, n=5):
    rng = np.random.default_rng(1)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = {}
    for name, count in (("train", 2 * n), ("test", n)):
        images = rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 100, count)
        batch = {b"data": images.reshape(count, -1), b"fine_labels": list(labels),
                 b"coarse_labels": list(labels // 5), b"filenames": [b"x"] * count}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        out[name] = (images, labels)
    return out


def idx_bytes(array):
    header = struct.pack(">I", 0x0800 + array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def make_mnist(root, gz=True, n_train=6, n_test=3):
    rng = np.random.default_rng(2)
    folder = root / "mnist"
    folder.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for stem, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.fixture(autouse=True)
def _fresh_cache():
    datasets._load_cached.cache_clear()
    yield
    datasets._load_cached.cache_clear()


@pytest.fixture
def offline(monkeypatch):
    """Point every download at a closed local port, so it fails at once."""
    dead = "http://127.0.0.1:9/"
    archives = {k: datasets._Archive(dead + k, a.md5, a.folder, a.files, a.extract) for k, a in datasets._ARCHIVES.items()}
    monkeypatch.setattr(datasets, "_ARCHIVES", archives)
    monkeypatch.setattr(datasets, "_MNIST_URL", dead)


def test_cifar10_reader_values(tmp_path):
    arrays = make_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.train_images.shape == (20, 3, 32, 32)
    assert ds.train_images.dtype.is_floating_point is False
    np.testing.assert_array_equal(ds.train_images[4:8].numpy(), arrays[1][0])
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays[5][1])
    assert ds.num_classes == 10


def test_cifar100_reader_uses_fine_labels(tmp_path):
    arrays = make_cifar100(tmp_path)
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100
    np.testing.assert_array_equal(ds.train_labels.numpy(), arrays["train"][1])
    np.testing.assert_array_equal(ds.test_images.numpy(), arrays["test"][0])


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reader(tmp_path, gz):
    arrays = make_mnist(tmp_path, gz=gz)
    ds = load_dataset("mnist", tmp_path)
    assert ds.train_images.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_truncated_cifar_batch_named(tmp_path):
    make_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DatasetError, match="data_batch_3 is truncated or corrupt"):
        load_dataset("cifar10", tmp_path)


def test_garbage_cifar_batch_named(tmp_path):
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="test_batch is truncated or corrupt"):
        load_dataset("cifar10", tmp_path)


def test_truncated_mnist_gzip_named(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz is truncated or corrupt"):
        load_dataset("mnist", tmp_path)


def test_mnist_short_payload_named(tmp_path):
    arrays = make_mnist(tmp_path, gz=False)
    path = tmp_path / "mnist" / "t10k-images-idx3-ubyte"
    path.write_bytes(idx_bytes(arrays["t10k-images-idx3-ubyte"])[:-28])
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte is truncated"):
        load_dataset("mnist", tmp_path)


def test_mnist_bad_magic_named(tmp_path):
    make_mnist(tmp_path, gz=False)
    path = tmp_path / "mnist" / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x09\x99" + path.read_bytes()[4:])
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte is corrupt: IDX magic"):
        load_dataset("mnist", tmp_path)


def test_missing_cifar_offline_names_folder_and_files(tmp_path, offline):
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "cifar-10-batches-py/data_batch_1" in message
    assert "--data-dir" in message and "ENGINE_DATA_DIR" in message
    assert "\n" not in message


def test_missing_mnist_file_offline(tmp_path, offline):
    make_mnist(tmp_path)
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match=r"missing: mnist/t10k-labels-idx1-ubyte.gz\)"):
        load_dataset("mnist", tmp_path)


def test_data_dir_precedence(tmp_path, monkeypatch):
    other = tmp_path / "env"
    other.mkdir()
    monkeypatch.setenv("ENGINE_DATA_DIR", str(other))
    assert resolve_data_dir(tmp_path) == tmp_path
    assert resolve_data_dir() == other
    monkeypatch.delenv("ENGINE_DATA_DIR")
    assert "learnability-engine" in str(resolve_data_dir())


def test_missing_data_dir_rejected(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="does not exist; pass an existing folder to --data-dir"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.setenv("ENGINE_DATA_DIR", str(tmp_path / "gone"))
    with pytest.raises(UsageError, match="ENGINE_DATA_DIR"):
        resolve_data_dir()


def test_unknown_dataset_rejected(tmp_path):
    with pytest.raises(UsageError, match="unknown dataset 'svhn'"):
        load_dataset("svhn", tmp_path)


def test_real_cifar10_known_values(data_dir):
    ds = load_dataset("cifar10", data_dir)
    assert ds.train_images.shape == (50000, 3, 32, 32)
    assert ds.test_images.shape == (10000, 3, 32, 32)
    assert ds.train_labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert ds.test_labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    # First pixels of the first training image, red plane (published values of the original file).
    assert ds.train_images[0, 0, 0, :3].tolist() == [59, 43, 50]
    assert np.bincount(ds.train_labels.numpy()).tolist() == [5000] * 10


def test_real_mnist_counts(data_dir):
    ds = load_dataset("mnist", data_dir)
    assert ds.train_images.shape == (60000, 1, 28, 28)
    assert ds.train_labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert np.bincount(ds.test_labels.numpy()).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
