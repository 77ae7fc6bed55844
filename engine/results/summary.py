"""Statistics of a run from its stored predictions, beside the published values.

Learnability of a cell is the percentage of D3 on which N2 predicts N1's class;
N1's test accuracy is its percentage of correct predictions on D3. Each number is
the mean and sample standard deviation (ddof=1) over the seeds whose networks
finished; a cell also counts its runs, those where every network reached the
training-error target, and those that failed.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from kernels import agreement
from engine.experiments.plan import Plan
from engine.experiments.recipes import recipes_dir
from engine.results.store import RunStore

PAPER_COLUMNS = ("table", "dataset", "n1", "n2", "regime", "n1_batch_size", "metric", "key", "mean", "std")
SUMMARY_COLUMNS = PAPER_COLUMNS + ("runs", "reached_target", "failed", "missing", "paper_mean", "paper_std")


@dataclass
class CellStats:
    """One row of ``summary.csv``: a metric of a (n1, n2, regime, batch size) cell over seeds."""

    table: str
    dataset: str
    n1: str
    n2: str
    regime: str
    n1_batch_size: int
    metric: str
    key: str = ""
    values: list[float] = field(default_factory=list)
    reached_target: int = 0
    failed: int = 0
    missing: int = 0
    paper_mean: float | None = None
    paper_std: float | None = None

    @property
    def runs(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else math.nan

    @property
    def capped(self) -> bool:
        """Whether some finished run stopped at the epoch cap instead of the target."""
        return self.reached_target < self.runs

    def index(self) -> tuple:
        return (self.table, self.dataset, self.n1, self.n2, self.regime, self.n1_batch_size, self.metric, self.key)


def load_paper_values(path: Path | None = None) -> dict[tuple, tuple[float, float | None]]:
    """Read the published values, keyed like :meth:`CellStats.index`."""
    path = path or recipes_dir() / "paper_values.csv"
    values = {}
    if not path.is_file():
        return values
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            index = (row["table"], row["dataset"], row["n1"], row["n2"], row["regime"],
                     int(row["n1_batch_size"]), row["metric"], row["key"])
            values[index] = (float(row["mean"]), float(row["std"]) if row["std"] else None)
    return values


def summarize(plan: Plan, store: RunStore, paper: dict | None = None) -> list[CellStats]:
    """Compute every metric of the plan's cells from the stored predictions."""
    recipe = plan.recipe
    paper = load_paper_values() if paper is None else paper
    table = recipe.paper_table or recipe.name
    cells: dict[tuple, CellStats] = {}
    records: dict[str, dict | None] = {}
    predictions: dict[str, dict] = {}

    def record(key: str) -> dict | None:
        if key not in records:
            records[key] = store.record(key) if store.has(key) else None
        return records[key]

    def preds(key: str) -> dict:
        if key not in predictions:
            predictions[key] = store.predictions(key)
        return predictions[key]

    def stats(n1: str, n2: str, regime: str, batch: int, metric: str) -> CellStats:
        index = (table, recipe.dataset, n1, n2, regime, batch, metric, "")
        if index not in cells:
            cells[index] = CellStats(*index)
        return cells[index]

    seen_n1: set[tuple[str, str]] = set()
    for cell in plan.cells:
        n1_rec, n2_rec = record(cell.n1_key), record(cell.n2_key)
        if "learnability" in recipe.metrics:
            row = stats(cell.n1, cell.n2, cell.regime, cell.n1_batch_size, "learnability")
            _add(row, [n1_rec, n2_rec], lambda: 100.0 * agreement(preds(cell.n2_key)["d3"], preds(cell.n1_key)["d3"]))
        if "test_accuracy" in recipe.metrics and (cell.n1_key, "acc") not in seen_n1:
            seen_n1.add((cell.n1_key, "acc"))
            row = stats(cell.n1, "", cell.regime, cell.n1_batch_size, "test_accuracy")
            p = None if n1_rec is None else preds(cell.n1_key) if n1_rec["status"] == "ok" else None
            _add(row, [n1_rec], lambda: 100.0 * agreement(p["d3"], p["d3_labels"]))
    for row in cells.values():
        row.paper_mean, row.paper_std = paper.get(row.index(), (None, None))
    return list(cells.values())


def _add(row: CellStats, network_records: list[dict | None], compute) -> None:
    if any(r is None for r in network_records):
        if any(r is not None and r["status"] != "ok" for r in network_records):
            row.failed += 1
        else:
            row.missing += 1
        return
    if any(r["status"] != "ok" for r in network_records):
        row.failed += 1
        return
    row.values.append(float(compute()))
    row.reached_target += all(r["reached_target"] for r in network_records)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def summary_csv(rows: Iterable[CellStats]) -> str:
    """Render rows with the columns of the published values plus our counts."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for r in rows:
        writer.writerow([
            r.table, r.dataset, r.n1, r.n2, r.regime, r.n1_batch_size, r.metric, r.key,
            _fmt(r.mean), _fmt(r.std), r.runs, r.reached_target, r.failed, r.missing,
            _fmt(r.paper_mean), _fmt(r.paper_std),
        ])
    return out.getvalue()
