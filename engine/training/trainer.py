"""Train one network to the stop rule and predict with it."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from engine.data.loaders import TensorLoader
from engine.data.splits import to_float
from engine.training.config import TrainConfig
from engine.training.schedule import STOP_DIVERGED, STOP_TARGET, PlateauSchedule

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """What a training did: its stop, schedule and per-epoch training errors."""

    epochs: int
    final_train_error: float
    stop_reason: str
    lr_drops: list[int]
    final_lr: float
    train_errors: list[float] = field(default_factory=list)
    failure: str | None = None
    wall_time_s: float = 0.0

    @property
    def status(self) -> str:
        return "failed" if self.failure else "ok"

    @property
    def reached_target(self) -> bool:
        return self.stop_reason == STOP_TARGET


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Return the autocast context of a precision name (``fp32`` means none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_network(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    order_seed: int,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float, nn.Module], None] | None = None,
) -> TrainOutcome:
    """Train ``model`` in place on uint8 ``images`` and int ``labels`` until the stop rule.

    Args:
        model: the network, already initialized; moved to ``device``.
        images: uint8 ``[n, C, H, W]`` training images.
        labels: int ``[n]`` training labels.
        config: the protocol (learning rate, schedule, stop rule, precision).
        order_seed: seed of the per-epoch minibatch order.
        device: where to train.
        on_epoch: called after each epoch with (epoch, training error, model).

    A NaN or infinite loss ends the training with ``stop_reason == "diverged"`` and a
    ``failure`` message; it does not raise.
    """
    device = torch.device(device)
    started = time.perf_counter()
    model.to(device).train()
    loader = TensorLoader(images, labels, config.batch_size, device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16" and device.type == "cuda")
    schedule = PlateauSchedule(config)
    generator = torch.Generator().manual_seed(order_seed)
    errors: list[float] = []
    failure = None
    n = len(labels)
    while not schedule.stopped:
        mistakes = torch.zeros((), dtype=torch.int64, device=device)
        loss_sum = torch.zeros((), device=device)
        for x, y in loader.epoch(generator):
            with autocast_context(config.precision, device):
                logits = model(x)
                loss = nn.functional.cross_entropy(logits, y)
            mistakes += (logits.argmax(1) != y).sum()
            loss_sum += loss.detach().float()
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        # NOTE: one finiteness check per epoch instead of per step avoids a device sync
        # per step; a diverged run is still stopped within the epoch it diverged in.
        if not math.isfinite(loss_sum.item()):
            failure = f"non-finite loss in epoch {schedule.epoch + 1} (lr {schedule.lr:g})"
            schedule.diverge()
            errors.append(float("nan"))
            log.warning("training diverged: %s", failure)
            break
        if config.exact_train_error:
            error = float((predict(model, images, device=device) != labels.numpy()).mean())
            model.train()
        else:
            error = mistakes.item() / n
        errors.append(error)
        schedule.update(error)
        if schedule.lr != optimizer.param_groups[0]["lr"]:
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr
        if on_epoch is not None:
            on_epoch(schedule.epoch, error, model)
    return TrainOutcome(
        epochs=schedule.epoch,
        final_train_error=errors[-1],
        stop_reason=schedule.stop_reason,
        lr_drops=list(schedule.lr_drops),
        final_lr=schedule.lr,
        train_errors=errors,
        failure=failure,
        wall_time_s=time.perf_counter() - started,
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 1000,
    precision: str = "fp32",
) -> np.ndarray:
    """Return the argmax class of every uint8 image as a compact integer array."""
    device = torch.device(device)
    model.to(device).eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start : start + batch_size].to(device))
        with autocast_context(precision, device):
            out.append(model(x).argmax(1).to(torch.int16).cpu())
    if not out:
        return np.zeros(0, dtype=np.int16)
    return torch.cat(out).numpy()
