"""The plateau learning-rate schedule and the stop rule, epoch by epoch."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.training.config import TrainConfig

STOP_TARGET = "target_error"  # training error fell below the target
STOP_CAP = "max_epochs"  # the epoch cap was reached first
STOP_DIVERGED = "diverged"  # a non-finite loss


@dataclass
class PlateauSchedule:
    """Decide after each epoch whether to drop the learning rate and whether to stop.

    The learning rate is divided by ``lr_drop_factor`` when the training error has
    not decreased below its best value for ``plateau_epochs`` epochs in a row; the
    count then starts again. Training stops as soon as the error is below
    ``target_error``, or when ``max_epochs`` epochs have run.
    """

    config: TrainConfig
    lr: float = field(init=False)
    epoch: int = 0
    best_error: float = float("inf")
    epochs_without_decrease: int = 0
    lr_drops: list[int] = field(default_factory=list)
    stop_reason: str | None = None

    def __post_init__(self) -> None:
        self.lr = self.config.lr

    def update(self, error: float) -> None:
        """Record the training error of the epoch just finished."""
        if self.stop_reason is not None:
            raise RuntimeError("the schedule has already stopped")
        self.epoch += 1
        if error < self.config.target_error:
            self.stop_reason = STOP_TARGET
            return
        if error < self.best_error:
            self.best_error = error
            self.epochs_without_decrease = 0
        else:
            self.epochs_without_decrease += 1
            if self.epochs_without_decrease >= self.config.plateau_epochs:
                self.lr /= self.config.lr_drop_factor
                self.lr_drops.append(self.epoch)
                self.epochs_without_decrease = 0
        if self.epoch >= self.config.max_epochs:
            self.stop_reason = STOP_CAP

    def diverge(self) -> None:
        """Stop because the loss became NaN or infinite."""
        self.epoch += 1
        self.stop_reason = STOP_DIVERGED

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None
