"""The FFCV loader: each training set written once to a .beton file, read back by FFCV.

A .beton file contains the uint8 images and each image's row index, keyed by a hash of
the image bytes, so the N2 jobs of one seed (same D2 images, different labels from
their N1) share one file. Labels stay in memory and are gathered by the row index
that FFCV returns, so a batch is exactly what ``TensorLoader`` yields for the same
order. FFCV reuses its output buffers between batches; this loader copies every
batch out of them before yielding it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pooch
import torch

from engine.data.loaders import Batch, check_training_set, epoch_order, one_thread, scale_pixels, to_layout
from engine.errors import UsageError

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "FFCV is not installed: pip install -e '.[ffcv]'. It builds from source against the "
    "system packages pkg-config, OpenCV and libturbojpeg (on Debian or Ubuntu: "
    "apt-get install pkg-config libopencv-dev libturbojpeg0-dev); or use --loader tensor"
)


@contextlib.contextmanager
def torch_threads_kept():
    """Restore PyTorch's intra-op thread count after the block.

    NOTE: FFCV 1.0.2 sets PyTorch's thread count as a side effect: to 1 when it is
    imported, and to the loader's ``num_workers`` when a loader is built or iterated.
    """
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def import_ffcv() -> dict[str, Any]:
    """Import the FFCV names this loader uses, or raise ``UsageError`` with the install command."""
    try:
        with torch_threads_kept():
            from ffcv.fields import IntField, NDArrayField
            from ffcv.fields.basics import IntDecoder
            from ffcv.fields.decoders import NDArrayDecoder
            from ffcv.loader import Loader, OrderOption
            from ffcv.transforms import ToTensor
            from ffcv.writer import DatasetWriter
    except ImportError as exc:
        raise UsageError(f"{INSTALL_HINT} (import failed: {exc})") from exc
    _silence_writer_progress()
    return {
        "IntField": IntField,
        "NDArrayField": NDArrayField,
        "IntDecoder": IntDecoder,
        "NDArrayDecoder": NDArrayDecoder,
        "Loader": Loader,
        "OrderOption": OrderOption,
        "ToTensor": ToTensor,
        "DatasetWriter": DatasetWriter,
    }


def _silence_writer_progress() -> None:
    """Turn off the progress bar that FFCV's writer draws on stderr.

    ``--quiet`` cannot reach that bar, and a .beton file takes only seconds to
    write. ``write_beton`` logs the write instead.
    """
    import ffcv.writer

    bar = getattr(ffcv.writer, "tqdm", None)
    if isinstance(bar, type):
        ffcv.writer.tqdm = functools.partial(bar, disable=True)


def default_cache_dir() -> Path:
    """Return the per-user folder of .beton files."""
    return Path(pooch.os_cache("learnability-engine")) / "ffcv"


def images_digest(images: np.ndarray) -> str:
    """Return a hash of the images' shape and bytes, the name of their .beton file."""
    digest = hashlib.sha256(repr((images.shape, str(images.dtype))).encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()[:24]


class _IndexedImages:
    """The indexed dataset FFCV's writer reads: sample i is (image i, i)."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], i


def write_beton(images: np.ndarray, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write uint8 ``images`` ``[n, C, H, W]`` with their row index to a .beton file, once.

    The file is named by ``images_digest``; an existing file is reused. A new file is
    written under a temporary name and renamed, so a killed write leaves no file
    that a later run would take for complete.
    """
    ffcv = import_ffcv()
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{images_digest(images)}.beton"
    if path.exists():
        return path
    handle, partial = tempfile.mkstemp(dir=folder, suffix=".beton.partial")
    os.close(handle)
    try:
        fields = {
            "image": ffcv["NDArrayField"](dtype=np.dtype("uint8"), shape=tuple(images.shape[1:])),
            "index": ffcv["IntField"](),
        }
        writer = ffcv["DatasetWriter"](partial, fields, num_workers=1)
        writer.from_indexed_dataset(_IndexedImages(images))
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    log.info("wrote %d images to %s", len(images), path)
    return path


class FFCVLoader:
    """Serve minibatches of one training set through FFCV, in the order the caller's generator draws.

    Args:
        images: uint8 ``[n, C, H, W]`` training images.
        labels: int ``[n]`` labels (kept in memory on ``device``).
        batch_size: images per batch; the last batch may be smaller.
        device: where the batches are delivered.
        channels_last: deliver batches in channels_last memory layout.
        cache_dir: folder of the .beton files (None: a per-user cache folder).
        num_workers: FFCV's decoding threads (None: torch's intra-op thread count).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        channels_last: bool = False,
        cache_dir: str | os.PathLike | None = None,
        num_workers: int | None = None,
    ) -> None:
        check_training_set(images, labels)
        ffcv = import_ffcv()
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.n = len(labels)
        self.labels = labels.to(device=self.device, dtype=torch.int64)
        self.path = write_beton(images.cpu().numpy(), cache_dir)
        # NOTE: FFCV 1.0.2 rejects custom TraversalOrder classes (its Loader calls
        # the order instance), so the loader reads SEQUENTIAL order and each epoch
        # replaces the indices that the sequential order returns.
        with torch_threads_kept():
            self._loader = ffcv["Loader"](
                str(self.path),
                batch_size=batch_size,
                num_workers=num_workers or torch.get_num_threads(),
                order=ffcv["OrderOption"].SEQUENTIAL,
                drop_last=False,
                os_cache=True,
                pipelines={
                    "image": [ffcv["NDArrayDecoder"](), ffcv["ToTensor"]()],
                    "index": [ffcv["IntDecoder"](), ffcv["ToTensor"]()],
                },
            )

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        order = epoch_order(self.n, generator).numpy()
        self._loader.indices = order
        self._loader.traversal_order.indices = order
        with torch_threads_kept():
            batches = iter(self._loader)
        for images, index in batches:
            with one_thread(self.device):
                # The cast to float allocates a new tensor, so nothing kept refers to FFCV's buffers.
                x = to_layout(scale_pixels(images.to(self.device, non_blocking=True)), self.channels_last)
                rows = index.reshape(-1).to(self.device, dtype=torch.int64, copy=True)
                batch = x, self.labels[rows]
            yield batch

    def close(self) -> None:
        """Drop the FFCV loader; the .beton file stays in the cache folder for later runs."""
        self._loader = None
