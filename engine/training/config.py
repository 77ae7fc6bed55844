"""The training protocol as a config: every knob of the stop and schedule rules."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from engine.errors import UsageError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Protocol of one training; the defaults are the study's protocol.

    Attributes:
        lr: initial learning rate of plain SGD.
        momentum: SGD momentum (0 in the protocol).
        weight_decay: L2 penalty (0 in the protocol).
        batch_size: minibatch size; the last batch of an epoch may be smaller.
        lr_drop_factor: the learning rate is divided by this on a plateau.
        plateau_epochs: epochs without a decrease of the training error before a drop.
        target_error: training stops once the epoch's 0-1 training error is below this.
        max_epochs: training stops after this many epochs (the cap).
        exact_train_error: measure each epoch's training error with a separate
            evaluation pass instead of counting mistakes on the epoch's forward passes.
        precision: arithmetic of forward and backward passes: fp32, or bf16/fp16 autocast.
    """

    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 64
    lr_drop_factor: float = 4.0
    plateau_epochs: int = 10
    target_error: float = 0.01
    max_epochs: int = 500
    exact_train_error: bool = False
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("lr", "lr_drop_factor", "target_error"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name}={getattr(self, name)!r} must be positive")
        for name in ("batch_size", "plateau_epochs", "max_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name}={value!r} must be a positive integer")
        if self.momentum < 0 or self.weight_decay < 0:
            raise UsageError("momentum and weight_decay must not be negative")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision={self.precision!r} is unknown; choose from {', '.join(PRECISIONS)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Build a config, rejecting unknown keys and values of the wrong type by name."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in values.items():
            if key not in fields:
                raise UsageError(f"unknown training option {key!r}; valid options: {', '.join(fields)}")
            expected = type(fields[key].default)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise UsageError(f"training option {key}={value!r} must be of type {expected.__name__}")
        return cls(**{k: (float(v) if type(fields[k].default) is float else v) for k, v in values.items()})
