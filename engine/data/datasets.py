"""Readers for CIFAR-10, CIFAR-100 and MNIST in their canonical file formats.

Images come back as uint8 ``[N, C, H, W]`` tensors and labels as int64 ``[N]``.
The data directory is ``--data-dir``, else ``$ENGINE_DATA_DIR``, else a per-user
cache directory. A dataset missing there is downloaded from its canonical address
and checked against its published MD5 checksum with pooch.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pooch
import torch

from engine.errors import DatasetError, UsageError
from engine.models.registry import CIFAR10, CIFAR100, MNIST, InputSpec

log = logging.getLogger(__name__)

DATA_DIR_ENV = "ENGINE_DATA_DIR"
DATASET_NAMES = ("cifar10", "cifar100", "mnist")
DATASET_SPECS = {"cifar10": CIFAR10, "cifar100": CIFAR100, "mnist": MNIST}


@dataclass(frozen=True)
class Dataset:
    """A labelled train set and test set held in memory as uint8 images."""

    name: str
    spec: InputSpec
    train_images: torch.Tensor  # uint8 [N, C, H, W]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes


@dataclass(frozen=True)
class _Archive:
    url: str
    md5: str
    folder: str  # where the archive's files end up inside the data directory
    files: tuple[str, ...]
    extract: bool  # tar archive unpacked in place, or single files kept as downloaded


_ARCHIVES = {
    "cifar10": _Archive(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        files=tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
        extract=True,
    ),
    "cifar100": _Archive(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        files=("train", "test"),
        extract=True,
    ),
}

# The original MNIST files and their published MD5 checksums (gzipped form).
_MNIST_URL = "https://yann.lecun.com/exdb/mnist/"
_MNIST_FILES = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Return ``data_dir``, else ``$ENGINE_DATA_DIR``, else the per-user cache directory."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise UsageError(
                f"data directory {str(path)!r} does not exist; "
                "pass an existing folder to --data-dir"
            )
        return path
    if os.environ.get(DATA_DIR_ENV):
        path = Path(os.environ[DATA_DIR_ENV]).expanduser()
        if not path.is_dir():
            raise UsageError(
                f"data directory {str(path)!r} from ${DATA_DIR_ENV} does not exist; "
                f"set ${DATA_DIR_ENV} to an existing folder"
            )
        return path
    return Path(pooch.os_cache("learnability-engine"))


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Read a dataset from the data directory, downloading it first where it is missing.

    Raises:
        UsageError: the name is unknown.
        DatasetError: a file is missing and cannot be downloaded, or is truncated or corrupt.
    """
    if name not in DATASET_NAMES:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return _load_cached(name, resolve_data_dir(data_dir).resolve())


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, root: Path) -> Dataset:
    if name == "mnist":
        return _load_mnist(root)
    return _load_cifar(name, root)


def _fetch_archive(name: str, root: Path, missing: list[str]) -> None:
    archive = _ARCHIVES[name]
    log.info("downloading %s from %s into %s", name, archive.url, root)
    try:
        pooch.retrieve(
            archive.url,
            known_hash=f"md5:{archive.md5}",
            path=root,
            processor=pooch.Untar(extract_dir=".") if archive.extract else None,
            progressbar=False,
        )
    except Exception as exc:  # noqa: BLE001  (network, permission and checksum errors alike)
        raise _missing_error(name, root, missing, exc) from exc


def _missing_error(name: str, root: Path, missing: list[str], exc: Exception) -> DatasetError:
    return DatasetError(
        f"{name} is not in {root} (missing: {', '.join(missing)}) and the download failed "
        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}); "
        f"copy the files there, or point --data-dir or ${DATA_DIR_ENV} at a folder that has them"
    )


def _load_cifar(name: str, root: Path) -> Dataset:
    archive = _ARCHIVES[name]
    folder = root / archive.folder
    missing = [f"{archive.folder}/{f}" for f in archive.files if not (folder / f).is_file()]
    if missing:
        _fetch_archive(name, root, missing)
    label_key = b"labels" if name == "cifar10" else b"fine_labels"
    train = [_read_pickle(folder / f) for f in archive.files[:-1]]
    test = _read_pickle(folder / archive.files[-1])
    spec = CIFAR10 if name == "cifar10" else CIFAR100
    train_x = np.concatenate([_cifar_images(b, folder / f) for b, f in zip(train, archive.files)])
    train_y = np.concatenate([_cifar_labels(b, label_key, folder / f, spec) for b, f in zip(train, archive.files)])
    test_path = folder / archive.files[-1]
    return Dataset(
        name=name,
        spec=spec,
        train_images=torch.from_numpy(train_x),
        train_labels=torch.from_numpy(train_y),
        test_images=torch.from_numpy(_cifar_images(test, test_path)),
        test_labels=torch.from_numpy(_cifar_labels(test, label_key, test_path, spec)),
    )


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DatasetError(
            f"{path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
            "delete it and copy or download it again"
        ) from exc
    if not isinstance(batch, dict):
        raise DatasetError(f"{path} is corrupt: expected a pickled dict, found {type(batch).__name__}")
    return batch


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    data = batch.get(b"data")
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DatasetError(f"{path} is corrupt: b'data' should be an [N, 3072] array, found {shape}")
    return np.ascontiguousarray(data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32))


def _cifar_labels(batch: dict, key: bytes, path: Path, spec: InputSpec) -> np.ndarray:
    if key not in batch:
        raise DatasetError(f"{path} is corrupt: it has no {key!r} entry")
    labels = np.asarray(batch[key], dtype=np.int64)
    if len(labels) != len(batch[b"data"]):
        raise DatasetError(f"{path} is corrupt: {len(labels)} labels for {len(batch[b'data'])} images")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DatasetError(f"{path} is corrupt: labels outside [0, {spec.num_classes})")
    return labels


def _find_mnist_file(root: Path, stem: str) -> Path | None:
    for folder in (root / "mnist", root / "MNIST" / "raw", root):
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                return candidate
    return None


def _load_mnist(root: Path) -> Dataset:
    paths = {stem: _find_mnist_file(root, stem) for stem in _MNIST_FILES}
    missing = [f"mnist/{stem}.gz" for stem, path in paths.items() if path is None]
    if missing:
        try:
            for stem in missing:
                name = Path(stem).name
                pooch.retrieve(
                    _MNIST_URL + name,
                    known_hash=f"md5:{_MNIST_FILES[Path(name).stem]}",
                    fname=name,
                    path=root / "mnist",
                    progressbar=False,
                )
        except Exception as exc:  # noqa: BLE001  (network, permission and checksum errors alike)
            raise _missing_error("mnist", root, missing, exc) from exc
        paths = {stem: _find_mnist_file(root, stem) for stem in _MNIST_FILES}
    images = {stem: _read_idx(path, ndim=3) for stem, path in paths.items() if "images" in stem}
    labels = {stem: _read_idx(path, ndim=1) for stem, path in paths.items() if "labels" in stem}
    train_x = images["train-images-idx3-ubyte"]
    train_y = labels["train-labels-idx1-ubyte"].astype(np.int64)
    test_x = images["t10k-images-idx3-ubyte"]
    test_y = labels["t10k-labels-idx1-ubyte"].astype(np.int64)
    for x, y, kind in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if len(x) != len(y):
            raise DatasetError(f"MNIST {kind} files disagree: {len(x)} images but {len(y)} labels")
        if y.size and y.max() >= 10:
            raise DatasetError(f"MNIST {kind} labels are corrupt: found label {int(y.max())}")
    return Dataset(
        name="mnist",
        spec=MNIST,
        train_images=torch.from_numpy(train_x[:, None]),
        train_labels=torch.from_numpy(train_y),
        test_images=torch.from_numpy(test_x[:, None]),
        test_labels=torch.from_numpy(test_y),
    )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (magic 0x0801 + ndim), gzipped or not."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{path} is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    if len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"{path} is truncated: {len(raw)} bytes is shorter than its header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise DatasetError(f"{path} is corrupt: IDX magic {magic:#x}, expected {0x0800 + ndim:#x}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DatasetError(
            f"{path} is truncated or corrupt: header says {dims} ({expected} bytes of data), "
            f"file has {len(raw) - offset}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims).copy()


