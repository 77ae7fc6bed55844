"""The tensor loader: a split resident on the training device, batched by indexing."""

from __future__ import annotations

from typing import Iterator

import torch

from engine.data.splits import to_float


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
        self.labels = labels.to(device=device, dtype=torch.int64)
        self.batch_size = batch_size
        self.dtype = dtype
        self.channels_last = channels_last

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.images), generator=generator).to(self.images.device)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.batch(index), self.labels[index]

    def batch(self, index: torch.Tensor) -> torch.Tensor:
        x = to_float(self.images[index], self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
