"""The run directory: one record and one predictions file per trained network.

Layout::

    RUN_DIR/run.json                  the last command's recipe, options and protocol
    RUN_DIR/networks/KEY.npz          predictions (uint8 class indices) and true labels
    RUN_DIR/networks/KEY.json         the record; written last, so it marks completion

Every file is written to a temporary name and renamed, so a run killed at any
moment leaves complete files or none.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def compact(predictions: np.ndarray) -> np.ndarray:
    """Store class indices as uint8 where they fit (up to 256 classes), else int16."""
    predictions = np.asarray(predictions)
    if predictions.size and (predictions.min() < 0 or predictions.max() > 255):
        return predictions.astype(np.int16)
    return predictions.astype(np.uint8)


class RunStore:
    """Records and predictions of the networks of one run directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.networks = self.root / "networks"
        self.networks.mkdir(parents=True, exist_ok=True)

    def has(self, key: str) -> bool:
        return (self.networks / f"{key}.json").is_file()

    def save(self, key: str, record: dict[str, Any], predictions: dict[str, np.ndarray]) -> None:
        """Save a network's predictions, then its record (the record marks completion)."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{name: compact(v) for name, v in predictions.items()})
        atomic_write_bytes(self.networks / f"{key}.npz", buffer.getvalue())
        atomic_write_text(self.networks / f"{key}.json", json.dumps(record, indent=1, sort_keys=True))

    def record(self, key: str) -> dict[str, Any]:
        return json.loads((self.networks / f"{key}.json").read_text())

    def predictions(self, key: str) -> dict[str, np.ndarray]:
        with np.load(self.networks / f"{key}.npz") as data:
            return {name: data[name] for name in data.files}

    def keys(self) -> Iterator[str]:
        for path in sorted(self.networks.glob("*.json")):
            yield path.stem

    def write_text(self, name: str, text: str) -> Path:
        path = self.root / name
        atomic_write_text(path, text)
        return path
