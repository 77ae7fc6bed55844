"""Train one network to the stop rule and predict with it."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from engine.data.loaders import make_loader, pixel_rows, rows_to_batch
from engine.errors import UsageError
from engine.training.config import TrainConfig
from engine.training.execution import ExecutionOptions
from engine.training.schedule import STOP_TARGET, PlateauSchedule

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
    execution: dict[str, Any] = field(default_factory=dict)

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


# NOTE: dynamo keeps at most ``recompile_limit`` compiled versions per forward
# function (8 in PyTorch 2.13) and falls back to eager beyond it. One forward
# (ShallowCNN.forward) serves every width of a family, and each width, layout and
# precision is one version, so a grid of 7 widths in two layouts needs more.
_RECOMPILE_LIMIT = 64


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """Return ``model`` compiled with ``torch.compile`` in ``mode``, or ``model`` itself for ``off``.

    The compiled module shares its parameters with ``model``. Shapes are static
    (``dynamic=False``): the trainers run full batches compiled and an epoch's smaller
    last batch eager, so a step never recompiles. Dynamo keys its cache on the forward
    function and guards on parameter shapes, so later models of the same
    architecture and layout in this process reuse the compiled code.
    """
    if mode == "off":
        return model
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), _RECOMPILE_LIMIT))
            break
    return torch.compile(model, mode=mode, dynamic=False)


def train_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    context: contextlib.AbstractContextManager,
    x: torch.Tensor,
    y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one SGD step on the minibatch ``(x, y)`` and return its logits and mean loss, without a host sync."""
    with context:
        logits = forward(x)
        loss = nn.functional.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return logits, loss


def resolve_execution(
    execution: ExecutionOptions | None,
    model: nn.Module,
    input_shape: tuple[int, ...],
    config: TrainConfig,
    n_train: int,
    device: torch.device,
) -> tuple[ExecutionOptions, dict[str, Any] | None]:
    """Return the options to train with, autotuning the undecided ones, and the autotune record.

    ``None`` means the plain eager loop: tensor loader, NCHW, no compilation, the
    process's thread count.
    Autotuning plans for one job of ``config.max_epochs`` epochs (an upper bound,
    since most runs stop at the target error first).
    """
    if execution is None:
        return ExecutionOptions(autotune=False).with_defaults(), None
    execution.check_device(device, config.precision)
    if execution.amp != "off" and execution.precision != config.precision:
        raise UsageError(
            f"--amp {execution.amp} requests precision {execution.precision}, but the training config has "
            f"precision {config.precision}; build the config with TrainConfig(precision=options.precision)"
        )
    if execution.resolved or not execution.autotune:
        return execution.with_defaults(), None
    from engine.training.autotune import tune_module

    steps = -(-n_train // config.batch_size)
    result = tune_module(
        model, input_shape, config.batch_size, config.precision, device, execution,
        planned_steps=steps * config.max_epochs, full_batches=n_train >= config.batch_size,
    )
    return result.options, result.to_dict()


def train_network(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    order_seed: int,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[int, float, nn.Module], None] | None = None,
    execution: ExecutionOptions | None = None,
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
        execution: loader, layout, compilation and autotuning; None trains as a plain
            eager loop (tensor loader, NCHW, no compilation). These options change
            rounding, never the protocol.

    A NaN or infinite loss ends the training with ``stop_reason == "diverged"`` and a
    ``failure`` message; it does not raise. The options used, and the autotune
    measurement if there was one, are in ``TrainOutcome.execution``.

    Raises:
        UsageError: an execution option the device cannot run, ``execution.amp``
            set but different from ``config.precision``, or a loader whose package
            is not installed.
        ValueError: an empty training set.
    """
    if len(labels) == 0:
        raise ValueError("cannot train on an empty training set: give at least one image")
    device = torch.device(device)
    started = time.perf_counter()
    options, tuning = resolve_execution(execution, model, tuple(images.shape[1:]), config, len(labels), device)
    previous_threads = torch.get_num_threads()
    if options.threads != previous_threads:
        torch.set_num_threads(options.threads)
    model.to(device).train()
    if options.channels_last:
        model.to(memory_format=torch.channels_last)
    loader = make_loader(
        options.loader, images, labels, config.batch_size, device,
        channels_last=options.channels_last, cache_dir=options.cache_dir,
    )
    compiled = compile_model(model, options.compile)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16" and device.type == "cuda")
    schedule = PlateauSchedule(config)
    generator = torch.Generator().manual_seed(order_seed)
    errors: list[float] = []
    failure = None
    n = len(labels)
    context = autocast_context(config.precision, device)
    try:
        while not schedule.stopped:
            mistakes = torch.zeros((), dtype=torch.int64, device=device)
            loss_sum = torch.zeros((), device=device)
            for x, y in loader.epoch(generator):
                # The smaller last batch runs eager, so the compiled code keeps one static shape.
                forward = compiled if len(y) == config.batch_size else model
                logits, loss = train_step(forward, optimizer, scaler, context, x, y)
                mistakes += (logits.argmax(1) != y).sum()
                loss_sum += loss.detach().float()
            # NOTE: one finiteness check per epoch instead of per step avoids a device sync
            # per step; a diverged run is still stopped within the epoch it diverged in.
            if not math.isfinite(loss_sum.item()):
                failure = f"non-finite loss in epoch {schedule.epoch + 1} (lr {schedule.lr:g})"
                schedule.diverge()
                errors.append(float("nan"))
                log.warning("training diverged: %s", failure)
                break
            if config.exact_train_error:
                predicted = predict(model, images, device=device, channels_last=options.channels_last)
                error = float((predicted != labels.numpy()).mean())
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
    finally:
        loader.close()
        if options.threads != previous_threads:
            torch.set_num_threads(previous_threads)
    record = options.to_dict()
    if tuning is not None:
        record["tuning"] = tuning
    return TrainOutcome(
        epochs=schedule.epoch,
        final_train_error=errors[-1],
        stop_reason=schedule.stop_reason,
        lr_drops=list(schedule.lr_drops),
        final_lr=schedule.lr,
        train_errors=errors,
        failure=failure,
        wall_time_s=time.perf_counter() - started,
        execution=record,
    )


# Images per forward pass of ``predict``. On a 2-core CPU, shallow CNNs of width 16
# and 64 predicted 2,000 images about twice as fast in batches of 32 to 100 as in
# batches of 1,000. The activations of 1,000 images (262 MB at width 64) do not fit
# the caches.
PREDICT_BATCH = {"cpu": 64, "cuda": 1000}


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> np.ndarray:
    """Return the argmax class of every uint8 image as a compact integer array.

    ``batch_size`` None evaluates ``PREDICT_BATCH`` images at a time for the
    device's type. ``channels_last`` feeds the batches in that memory layout (the
    layout a model trained with ``channels_last`` has its weights in).
    """
    device = torch.device(device)
    batch_size = batch_size or PREDICT_BATCH.get(device.type, PREDICT_BATCH["cuda"])
    model.to(device).eval()
    rows = pixel_rows(images, channels_last)
    out = []
    for start in range(0, len(images), batch_size):
        x = rows_to_batch(rows[start : start + batch_size].to(device), channels_last)
        with autocast_context(precision, device):
            out.append(model(x).argmax(1).to(torch.int16).cpu())
    if not out:
        return np.zeros(0, dtype=np.int16)
    return torch.cat(out).numpy()
