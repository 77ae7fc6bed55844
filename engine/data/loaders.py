"""Minibatch loaders of one training set, behind one interface.

Every loader draws an epoch's order with ``torch.randperm(n, generator=g)`` on the
CPU, so the order does not depend on the device or the backend, and yields float
images scaled to [-1, 1] with int64 labels. For the same generator state all
backends yield identical batches; the last batch of an epoch may be smaller.

- ``tensor``: the split resident on the training device as uint8, batched by
  indexing (no loader process). The default, and the fastest for CIFAR-sized data.
- ``ffcv``: the images written once to a .beton file, read by FFCV's loader
  (``engine.data.ffcv_loader``).
- ``dali``: a DALI pipeline fed from the same arrays (``engine.data.dali_loader``).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol, Sequence

import torch

from engine.errors import UsageError

LOADER_NAMES = ("tensor", "ffcv", "dali")

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchLoader(Protocol):
    """Interface of a loader for the trainers: its batch count and one epoch of batches at a time."""

    batch_size: int

    def __len__(self) -> int: ...

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]: ...

    def close(self) -> None: ...


def epoch_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """Draw one epoch's order of ``n`` samples on the CPU (int64 ``[n]``)."""
    return torch.randperm(n, generator=generator)


def check_training_set(images: torch.Tensor, labels: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``images`` is uint8 ``[n, ...]`` with one label per image."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 pixels, got {images.dtype}")


@contextlib.contextmanager
def one_thread(device: torch.device):
    """Run the block's CPU operators on one thread, then restore the thread count.

    A batch of 64 CIFAR images is too small to split across threads. With other
    processes busy on a 2-core CPU (PyTorch 2.13), gathering and scaling an epoch of
    25,000 images ran at 1,700 to 3,500 images/s on 2 threads, because each 2-thread
    operator waited for a descheduled thread. With this switch it ran at 115,000 to
    140,000 images/s.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def scale_pixels(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scale uint8 pixels to [-1, 1] with the arithmetic of ``to_float``, in place after one cast."""
    return images.to(dtype).div_(127.5).sub_(1.0)


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Return a 4-d batch in channels_last memory layout when requested; other shapes as they are."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def pixel_rows(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Return the uint8 images as rows to gather batches from: NHWC rows for channels_last.

    A batch gathered from NHWC rows and scaled is already channels_last memory (see
    ``rows_to_batch``), so no layout copy of the float batch is needed. For 64 CIFAR
    images on one CPU thread (PyTorch 2.13), a channels_last batch took a median of
    244 us from NCHW rows and 89 us from NHWC rows (``benchmarks/bench_speed.py``).
    """
    if channels_last and images.dim() == 4:
        return images.permute(0, 2, 3, 1).contiguous()
    return images


def rows_to_batch(rows: torch.Tensor, channels_last: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scale gathered rows of ``pixel_rows`` to a float batch ``[n, C, H, W]`` in [-1, 1]."""
    x = scale_pixels(rows, dtype)
    if channels_last and rows.dim() == 4:
        return x.permute(0, 3, 1, 2)
    return x


class TensorLoader:
    """Serve minibatches of one training set held on ``device`` as uint8.

    Each epoch draws a permutation from the caller's generator (on the CPU, so the
    order does not depend on the device) and yields float images scaled to [-1, 1]
    with their labels. The last batch of an epoch may be smaller than ``batch_size``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images.to(device)
        # Member batches ([G, b] indices) stay NCHW: channels_last is a 4-d layout.
        self.rows = pixel_rows(self.images, channels_last)
        self.labels = labels.to(device=device, dtype=torch.int64)
        self.batch_size = batch_size
        self.dtype = dtype
        self.channels_last = channels_last

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.images), generator).to(self.images.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            with one_thread(self.images.device):
                batch = self.batch(index), self.labels[index]
            yield batch

    def member_epochs(self, generators: Sequence[torch.Generator]) -> Iterator[Batch]:
        """Yield one epoch of every member at once, each in its own order.

        Member g draws its order from ``generators[g]`` exactly as ``epoch`` does, and
        each step gathers all members' batches with one ``[G, b]`` index: images
        ``[G, b, C, H, W]`` and labels ``[G, b]``.
        """
        orders = torch.stack([epoch_order(len(self.images), g) for g in generators]).to(self.images.device)
        for start in range(0, orders.shape[1], self.batch_size):
            index = orders[:, start : start + self.batch_size]
            with one_thread(self.images.device):
                batch = self.batch(index), self.labels[index]
            yield batch

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        """Gather the images at ``index`` (any shape) and scale them to [-1, 1]."""
        # index_select of flat rows took a third of the time of advanced indexing
        # (160 vs 2,770 us for 64 CIFAR images, PyTorch 2.13, 2 busy CPU cores).
        if index.dim() == 1:
            return rows_to_batch(self.rows.index_select(0, index), self.channels_last, self.dtype)
        rows = self.images.index_select(0, index.reshape(-1))
        return scale_pixels(rows.view(*index.shape, *self.images.shape[1:]), self.dtype)

    def close(self) -> None:
        """Release nothing: the tensors are freed with the loader."""


def make_loader(
    name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    channels_last: bool = False,
    cache_dir: str | None = None,
) -> BatchLoader:
    """Return the loader called ``name`` (tensor, ffcv or dali) over uint8 ``images`` and ``labels``.

    Args:
        name: the backend; ``ffcv`` and ``dali`` need their package extras.
        images: uint8 ``[n, C, H, W]`` training images.
        labels: int ``[n]`` labels.
        batch_size: images per batch; the last batch of an epoch may be smaller.
        device: where the batches are delivered.
        channels_last: deliver 4-d batches in channels_last memory layout.
        cache_dir: folder of FFCV's .beton files (None: a per-user cache folder).

    Raises:
        UsageError: the name is unknown, or its package is not installed (the
            message gives the install command).
    """
    check_training_set(images, labels)
    if name == "tensor":
        return TensorLoader(images, labels, batch_size, device, channels_last=channels_last)
    if name == "ffcv":
        from engine.data.ffcv_loader import FFCVLoader

        return FFCVLoader(images, labels, batch_size, device, channels_last=channels_last, cache_dir=cache_dir)
    if name == "dali":
        from engine.data.dali_loader import DALILoader

        return DALILoader(images, labels, batch_size, device, channels_last=channels_last)
    raise UsageError(f"unknown loader {name!r}; choose from {', '.join(LOADER_NAMES)}")


def check_loader(name: str) -> None:
    """Raise ``UsageError`` now if loader ``name`` could not run, so a run fails before it trains.

    The message of a missing package gives its install command (and, for FFCV, the
    system packages it builds against).
    """
    if name == "ffcv":
        from engine.data.ffcv_loader import import_ffcv

        import_ffcv()
    elif name == "dali":
        from engine.data.dali_loader import import_dali

        import_dali()
    elif name not in LOADER_NAMES:
        raise UsageError(f"unknown loader {name!r}; choose from {', '.join(LOADER_NAMES)}")
