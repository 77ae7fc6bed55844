"""The training protocol: config, schedule and the one-network trainer."""

from engine.training.config import PRECISIONS, TrainConfig
from engine.training.schedule import STOP_CAP, STOP_DIVERGED, STOP_TARGET, PlateauSchedule
from engine.training.trainer import TrainOutcome, predict, train_network

__all__ = [
    "PRECISIONS",
    "STOP_CAP",
    "STOP_DIVERGED",
    "STOP_TARGET",
    "PlateauSchedule",
    "TrainConfig",
    "TrainOutcome",
    "predict",
    "train_network",
]
