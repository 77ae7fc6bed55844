"""Run one network job: pick its data, train it, predict with it, build its record."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from engine.data.datasets import Dataset, load_dataset
from engine.data.splits import Split, make_split, n1_training_set
from engine.experiments.deadline import TimeUp
from engine.experiments.plan import NetworkJob
from engine.models import create_model
from engine.training.execution import ExecutionOptions
from engine.training.lanes import INIT_LOCK
from engine.training.trainer import TrainOutcome, predict, train_network


@dataclass
class DataContext:
    """The dataset of a run and its splits, loaded once and shared by all jobs."""

    dataset_name: str
    data_dir: str | None
    _dataset: Dataset | None = None
    _splits: dict[tuple[int, int | None], Split] = field(default_factory=dict)

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = load_dataset(self.dataset_name, self.data_dir)
        return self._dataset

    def split(self, seed: int, subset: int | None) -> Split:
        if (seed, subset) not in self._splits:
            self._splits[seed, subset] = make_split(self.dataset, seed, subset)
        return self._splits[seed, subset]

    def training_set(
        self, job: NetworkJob, parent_d2: np.ndarray | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the uint8 images and int64 labels that ``job`` trains on."""
        split = self.split(job.seed, job.subset)
        if job.role == "n1":
            return n1_training_set(self.dataset, split, job.regime)
        if parent_d2 is None or len(parent_d2) != len(split.d2):
            raise ValueError(f"{job.describe()}: needs its parent's {len(split.d2)} predictions on D2")
        images = self.dataset.train_images[torch.from_numpy(split.d2)]
        return images, torch.from_numpy(parent_d2.astype(np.int64))

    def eval_sets(self, job: NetworkJob) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
        """Return D2 and D3 images with their true labels."""
        split = self.split(job.seed, job.subset)
        d = self.dataset
        return {
            "d2": (d.train_images[torch.from_numpy(split.d2)], d.train_labels.numpy()[split.d2]),
            "d3": (d.test_images[torch.from_numpy(split.d3)], d.test_labels.numpy()[split.d3]),
        }


def build_model(job: NetworkJob, data: DataContext) -> torch.nn.Module:
    """Create the job's network with the initialization its seed fixes.

    Several lanes may create networks at once; the lock keeps each one's draws from
    the global RNG together.
    """
    with INIT_LOCK:
        torch.manual_seed(job.init_seed)
        return create_model(job.model, data.dataset.spec)


def make_record(job: NetworkJob, outcome: TrainOutcome, device: torch.device, trainer: str) -> dict[str, Any]:
    """Return the stored record of a finished training: its config, stop, errors, schedule and how it ran."""
    execution = outcome.execution or {}
    return {
        "key": job.key,
        "config": job.config(),
        "status": outcome.status,
        "failure": outcome.failure,
        "stop_reason": outcome.stop_reason,
        "reached_target": outcome.reached_target,
        "epochs": outcome.epochs,
        "final_train_error": outcome.final_train_error,
        "train_errors": outcome.train_errors,
        "lr_drops": outcome.lr_drops,
        "final_lr": outcome.final_lr,
        "wall_time_s": round(outcome.wall_time_s, 3),
        "device": str(device),
        "trainer": trainer,
        "threads": execution.get("threads") or torch.get_num_threads(),
        "execution": execution,
        "torch": torch.__version__,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def predictions_of(
    model: torch.nn.Module, job: NetworkJob, data: DataContext, device: torch.device, channels_last: bool = False
) -> dict[str, np.ndarray]:
    """Predict D2 and D3 with a trained model; the true labels are stored beside them.

    ``channels_last`` feeds the images in the layout the model was trained in.
    """
    out = {}
    for name, (images, labels) in data.eval_sets(job).items():
        out[name] = predict(model, images, device=device, precision=job.train.precision, channels_last=channels_last)
        out[f"{name}_labels"] = labels
    return out


def run_job(
    job: NetworkJob,
    data: DataContext,
    device: torch.device,
    parent_d2: np.ndarray | None = None,
    execution: ExecutionOptions | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train one network alone and return its record and predictions.

    ``execution`` picks the loader, layout, compilation and threads (see
    ``train_network``); None trains as a plain eager loop. ``stop`` is asked after
    every epoch; when it returns True the training ends with :class:`TimeUp`.

    For each of ``job.checkpoints`` the predictions at the end of that epoch are
    kept too, as ``d2@E`` and ``d3@E``. A network that stopped before epoch E is
    frozen from then on, so its checkpoint E contains the final predictions.
    """
    images, labels = data.training_set(job, parent_d2)
    model = build_model(job, data)
    checkpoints: dict[str, np.ndarray] = {}

    def after_epoch(epoch: int, error: float, network: torch.nn.Module) -> None:
        if stop is not None and stop():
            raise TimeUp(f"time limit reached in epoch {epoch} of {job.describe()}")
        if epoch in job.checkpoints:
            for name, values in predictions_of(network, job, data, device).items():
                if not name.endswith("_labels"):
                    checkpoints[f"{name}@{epoch}"] = values
            network.train()

    on_epoch = after_epoch if job.checkpoints or stop is not None else None
    outcome = train_network(
        model, images, labels, job.train, job.order_seed, device, on_epoch=on_epoch, execution=execution
    )
    if outcome.status != "ok":
        return make_record(job, outcome, device, "single"), {}
    predictions = predictions_of(model, job, data, device, bool(outcome.execution.get("channels_last")))
    for epoch in job.checkpoints:
        if epoch > outcome.epochs:
            checkpoints[f"d2@{epoch}"] = predictions["d2"]
            checkpoints[f"d3@{epoch}"] = predictions["d3"]
    return make_record(job, outcome, device, "single"), predictions | checkpoints
