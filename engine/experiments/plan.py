"""Turn a recipe into network jobs and the cells that combine them.

An N1 job trains one network on D1 under a data regime; an N2 job trains one on
D2 labelled by its parent N1. A job's key is a hash of its full config, so an N1
shared by several cells is one job, and a rerun finds what was already trained.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from engine.experiments.recipes import Recipe
from engine.seeds import derive_seed
from engine.training.config import TrainConfig

N2_BATCH_SIZE = 64


@dataclass(frozen=True)
class NetworkJob:
    """Train one network: N1 on D1 under ``regime``, or N2 on D2 labelled by ``parent``."""

    role: str  # "n1" or "n2"
    model: str
    dataset: str
    seed: int
    subset: int | None
    regime: str  # for N2, the regime of its parent N1
    train: TrainConfig
    parent: str | None = None  # key of the parent N1 (N2 jobs only)
    checkpoints: tuple[int, ...] = ()  # N1 epochs whose predictions are kept
    parent_epoch: int | None = None  # N2 learns the parent's checkpoint of this epoch

    def config(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.checkpoints:
            extra["checkpoints"] = list(self.checkpoints)
        if self.parent_epoch is not None:
            extra["parent_epoch"] = self.parent_epoch
        return extra | {
            "role": self.role,
            "model": self.model,
            "dataset": self.dataset,
            "seed": self.seed,
            "subset": self.subset,
            "regime": self.regime,
            "parent": self.parent,
            "train": self.train.to_dict(),
        }

    @property
    def key(self) -> str:
        text = json.dumps(self.config(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    @property
    def init_seed(self) -> int:
        return derive_seed(self.seed, "init", self.key)

    @property
    def order_seed(self) -> int:
        return derive_seed(self.seed, "order", self.key)

    @property
    def parent_d2_name(self) -> str:
        """Name of the parent's stored D2 predictions that this N2 learns."""
        return "d2" if self.parent_epoch is None else f"d2@{self.parent_epoch}"

    def describe(self) -> str:
        parent = f" <- N1 {self.parent[:8]}" if self.parent else ""
        if self.parent_epoch is not None:
            parent += f" @ epoch {self.parent_epoch}"
        return f"{self.role.upper()} {self.model} {self.regime} seed {self.seed} bs {self.train.batch_size}{parent}"


@dataclass(frozen=True)
class Cell:
    """One measurement: N2 trained on N1's labels, for one seed."""

    n1: str
    n2: str
    regime: str
    n1_batch_size: int
    seed: int
    n1_key: str
    n2_key: str | None  # None where the recipe trains no N2
    epoch: int | None = None  # the N1 checkpoint N2 learned, for learning curves


@dataclass
class Plan:
    """The deduplicated jobs of a recipe (N1 before N2) and the cells they serve."""

    recipe: Recipe
    subset: int | None
    train: TrainConfig
    n1_jobs: list[NetworkJob]
    n2_jobs: list[NetworkJob]
    cells: list[Cell]

    @property
    def jobs(self) -> list[NetworkJob]:
        return self.n1_jobs + self.n2_jobs


def build_plan(recipe: Recipe, train: TrainConfig, subset: int | None) -> Plan:
    """List the jobs and cells of ``recipe`` under the protocol ``train``.

    ``train.batch_size`` is replaced by each of the recipe's N1 batch sizes for N1,
    and N2 always trains with batch 64.
    """
    n1_jobs: dict[str, NetworkJob] = {}
    n2_jobs: dict[str, NetworkJob] = {}
    cells: list[Cell] = []
    n2_train = TrainConfig.from_dict({**train.to_dict(), "batch_size": N2_BATCH_SIZE})
    for seed in range(recipe.seeds):
        for regime in recipe.regimes:
            for batch_size in recipe.n1_batch_sizes:
                n1_train = TrainConfig.from_dict({**train.to_dict(), "batch_size": batch_size})
                for n1 in recipe.n1:
                    n1_job = NetworkJob(
                        "n1", n1, recipe.dataset, seed, subset, regime, n1_train, checkpoints=recipe.checkpoints
                    )
                    n1_jobs.setdefault(n1_job.key, n1_job)
                    if not recipe.train_n2:
                        cells.append(Cell(n1, "", regime, batch_size, seed, n1_job.key, None))
                    for n2 in recipe.n2_for(n1):
                        # A learning curve adds one N2 per checkpoint to the N2 of the final N1.
                        for epoch in recipe.checkpoints + (None,):
                            n2_job = NetworkJob(
                                "n2", n2, recipe.dataset, seed, subset, regime, n2_train,
                                parent=n1_job.key, parent_epoch=epoch,
                            )
                            n2_jobs.setdefault(n2_job.key, n2_job)
                            cells.append(Cell(n1, n2, regime, batch_size, seed, n1_job.key, n2_job.key, epoch))
    return Plan(recipe, subset, train, list(n1_jobs.values()), list(n2_jobs.values()), cells)
