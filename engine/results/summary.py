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

from engine.data.datasets import DATASET_SPECS
from engine.experiments.plan import Cell, Plan
from engine.experiments.recipes import recipes_dir
from engine.results.store import RunStore
from kernels import agreement, class_counts, distinct_prediction_counts, pairwise_agreement, tlp_plp_table

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


class _Loader:
    """Cache of the records and predictions a summary reads."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.records: dict[str, dict | None] = {}
        self.arrays: dict[str, dict] = {}

    def record(self, key: str | None) -> dict | None:
        if key is None:
            return None
        if key not in self.records:
            self.records[key] = self.store.record(key) if self.store.has(key) else None
        return self.records[key]

    def predictions(self, key: str) -> dict:
        if key not in self.arrays:
            self.arrays[key] = self.store.predictions(key)
        return self.arrays[key]


def summarize(plan: Plan, store: RunStore, paper: dict | None = None) -> list[CellStats]:
    """Compute every metric of the plan's cells from the stored predictions."""
    recipe = plan.recipe
    paper = load_paper_values() if paper is None else paper
    table = recipe.paper_table or recipe.name
    num_classes = DATASET_SPECS[recipe.dataset].num_classes
    load = _Loader(store)
    rows: dict[tuple, CellStats] = {}

    def stats(cell: Cell, n2: str, metric: str, key: str = "") -> CellStats:
        index = (table, recipe.dataset, cell.n1, n2, cell.regime, cell.n1_batch_size, metric, key)
        if index not in rows:
            rows[index] = CellStats(*index)
        return rows[index]

    per_n1_done: set[tuple] = set()
    for cell in plan.cells:
        n1_rec, n2_rec = load.record(cell.n1_key), load.record(cell.n2_key)
        n1_ok = n1_rec is not None and n1_rec["status"] == "ok"
        curve = bool(recipe.checkpoints)
        suffix = "" if cell.epoch is None else f"@{cell.epoch}"
        epoch_key = f"epoch={cell.epoch if cell.epoch is not None else 'final'}" if curve else ""

        if cell.n2_key is not None and "learnability" in recipe.metrics:
            _add(stats(cell, cell.n2, "learnability", epoch_key), [n1_rec, n2_rec], lambda: 100.0 * agreement(
                load.predictions(cell.n2_key)["d3"], load.predictions(cell.n1_key)[f"d3{suffix}"]))

        if cell.n2_key is not None and "tlp_plp_percent" in recipe.metrics:
            tables = [None]

            def tlp_plp() -> np.ndarray:
                if tables[0] is None:
                    p1, p2 = load.predictions(cell.n1_key), load.predictions(cell.n2_key)
                    tables[0] = 100.0 * tlp_plp_table(p1["d3_labels"], p1["d3"], p2["d3"]) / len(p1["d3"])
                return tables[0]

            for tlp in (0, 1):
                for plp in (0, 1):
                    _add(stats(cell, cell.n2, "tlp_plp_percent", f"tlp={tlp},plp={plp}"), [n1_rec, n2_rec],
                         lambda tlp=tlp, plp=plp: tlp_plp()[tlp, plp])

        if (cell.n1_key, cell.epoch) in per_n1_done:
            continue
        per_n1_done.add((cell.n1_key, cell.epoch))
        n1_preds = (lambda: load.predictions(cell.n1_key)) if n1_ok else None
        if "test_accuracy" in recipe.metrics and cell.epoch is None:
            _add(stats(cell, "", "test_accuracy"), [n1_rec],
                 lambda: 100.0 * agreement(n1_preds()["d3"], n1_preds()["d3_labels"]))
        if "test_error" in recipe.metrics:
            _add(stats(cell, "", "test_error", epoch_key), [n1_rec],
                 lambda: 100.0 - 100.0 * agreement(n1_preds()[f"d3{suffix}"], n1_preds()["d3_labels"]))
        if "class_share_d2" in recipe.metrics and cell.epoch is None:
            shares = [None]

            def class_share(c: int) -> float:
                if shares[0] is None:
                    d2 = n1_preds()["d2"]
                    shares[0] = 100.0 * class_counts(d2, num_classes) / len(d2)
                return shares[0][c]

            for c in range(num_classes):
                _add(stats(cell, "", "class_share_d2", f"class={c}"), [n1_rec], lambda c=c: class_share(c))

    if "seed_agreement" in recipe.metrics or "distinct_predictions" in recipe.metrics:
        _seed_statistics(plan, load, stats, table)
    for row in rows.values():
        row.paper_mean, row.paper_std = paper.get(row.index(), (None, None))
    return list(rows.values())


def _seed_statistics(plan: Plan, load: _Loader, stats, table: str) -> None:
    """Agreement between the N1 of different seeds on D3, and distinct predictions per image."""
    recipe = plan.recipe
    groups: dict[tuple, dict[int, Cell]] = defaultdict(dict)
    for cell in plan.cells:
        if cell.epoch is None:
            groups[cell.n1, cell.regime, cell.n1_batch_size][cell.seed] = cell
    for by_seed in groups.values():
        cells = [by_seed[s] for s in sorted(by_seed)]
        records = [load.record(c.n1_key) for c in cells]
        finished = [c for c, r in zip(cells, records) if r is not None and r["status"] == "ok"]
        matrix = None
        if len(finished) == len(cells) and len(cells) > 1:
            predictions = np.stack([load.predictions(c.n1_key)["d3"] for c in cells])
            matrix = pairwise_agreement(predictions)
            histogram = distinct_prediction_counts(predictions)
        first = cells[0]
        if "seed_agreement" in recipe.metrics:
            for i, ci in enumerate(cells):
                for j, cj in enumerate(cells):
                    # The published values name N2 as N1 for these rows.
                    row = stats(first, first.n1, "seed_agreement", f"i={ci.seed},j={cj.seed}")
                    _add(row, [records[i], records[j]] if matrix is not None else [records[i], None],
                         lambda i=i, j=j: matrix[i, j])
        if "distinct_predictions" in recipe.metrics:
            for m in range(1, len(cells) + 1):
                row = stats(first, "", "distinct_predictions", f"distinct={m}")
                _add(row, records if matrix is not None else records + [None],
                     lambda m=m: 100.0 * histogram[m - 1] / histogram.sum())


def _add(row: CellStats, network_records: list[dict | None], compute) -> None:
    if any(r is not None and r["status"] != "ok" for r in network_records):
        row.failed += 1
        return
    if any(r is None for r in network_records):
        row.missing += 1
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
