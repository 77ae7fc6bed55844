"""The DALI loader: a DALI pipeline fed batch by batch from the training set in memory.

The pipeline reads uint8 batches through an external source and scales them to
[-1, 1] with DALI's arithmetic operators (a cast to float32, a division by 127.5
and a subtraction of 1, the operations ``to_float`` does). Without a GPU the
pipeline runs DALI's CPU operators (``device_id=None``); with one, the batch is
copied to the GPU inside the pipeline and scaled there.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from engine.data.loaders import Batch, check_training_set, epoch_order, one_thread, to_layout
from engine.errors import UsageError

INSTALL_HINT = (
    "DALI is not installed: pip install -e '.[dali]' (the nvidia-dali-cuda120 wheel, whose "
    "CPU operators also run without a GPU); or use --loader tensor"
)


def import_dali() -> dict[str, Any]:
    """Import the DALI names this loader uses, or raise ``UsageError`` with the install command."""
    try:
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali import pipeline_def
        from nvidia.dali.plugin.pytorch import feed_ndarray
    except ImportError as exc:
        raise UsageError(f"{INSTALL_HINT} (import failed: {exc})") from exc
    return {"fn": fn, "types": types, "pipeline_def": pipeline_def, "feed_ndarray": feed_ndarray}


def build_pipeline(batch_size: int, device: torch.device, num_threads: int) -> Any:
    """Build the scaling pipeline: external source ``images`` (uint8 NCHW) -> float32 in [-1, 1]."""
    dali = import_dali()
    fn, types = dali["fn"], dali["types"]
    device_id = None if device.type != "cuda" else (device.index or 0)

    # Feeding and running alternate batch by batch, so the pipeline runs synchronously
    # with a queue of one batch.
    @dali["pipeline_def"](
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    def scale_images():
        images = fn.external_source(name="images", dtype=types.UINT8, layout="CHW")
        if device_id is not None:
            images = images.gpu()
        return fn.cast(images, dtype=types.FLOAT) / 127.5 - 1.0

    pipeline = scale_images()
    pipeline.build()
    return pipeline


class DALILoader:
    """Serve minibatches of one training set through a DALI pipeline, in the caller's order.

    Args:
        images: uint8 ``[n, C, H, W]`` training images (kept on the host as a NumPy array).
        labels: int ``[n]`` labels (kept on ``device``).
        batch_size: images per batch; the last batch may be smaller.
        device: where the batches are delivered; a CUDA device runs the GPU operators.
        channels_last: deliver batches in channels_last memory layout.
        num_threads: DALI's CPU worker threads (None: torch's intra-op thread count).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        channels_last: bool = False,
        num_threads: int | None = None,
    ) -> None:
        check_training_set(images, labels)
        if images.dim() != 4:
            raise ValueError(
                f"the dali loader reads images [n, C, H, W], got shape {tuple(images.shape)}; use the tensor loader"
            )
        self.feed_ndarray = import_dali()["feed_ndarray"]
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.images = np.ascontiguousarray(images.cpu().numpy())
        self.labels = labels.to(device=self.device, dtype=torch.int64)
        self.pipeline = build_pipeline(batch_size, self.device, num_threads or torch.get_num_threads())

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def epoch(self, generator: torch.Generator) -> Iterator[Batch]:
        order = epoch_order(len(self.images), generator)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            with one_thread(self.device):
                batch = to_layout(self._scaled(index.numpy()), self.channels_last), self.labels[index.to(self.device)]
            yield batch

    def _scaled(self, index: np.ndarray) -> torch.Tensor:
        """Run the pipeline on the images at ``index`` and copy its output into a new tensor."""
        self.pipeline.feed_input("images", self.images[index])
        (output,) = self.pipeline.run()
        batch = torch.empty((len(index),) + self.images.shape[1:], dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self.feed_ndarray(output.as_tensor(), batch, cuda_stream=stream)
        return batch

    def close(self) -> None:
        """Release the pipeline and its buffers."""
        self.pipeline = None
