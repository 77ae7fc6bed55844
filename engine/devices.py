"""The ``--device`` option, and the CPUs this process may use."""

from __future__ import annotations

import os

import torch

from engine.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """Return the torch device for ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        UsageError: the name is unknown or the device is not present on this machine.
    """
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPUs"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"device {name!r} requested but MPS is not available; use --device cpu")
        return device
    raise UsageError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or mps")


def usable_cpus() -> int:
    """Return the CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
