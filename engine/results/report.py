"""Write ``summary.csv`` and ``table.md`` of a run from its stored records."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from engine.experiments.plan import Plan
from engine.results.store import RunStore
from engine.results.summary import CellStats, summarize, summary_csv
from engine.results.table import render_table


def write_report(plan: Plan, store: RunStore, execution: dict[str, Any]) -> tuple[list[CellStats], str]:
    """Summarize the plan's cells, write both files atomically and return rows and table."""
    rows = summarize(plan, store)
    store.write_text("summary.csv", summary_csv(rows))
    table = render_table(plan, rows, execution)
    store.write_text("table.md", table)
    return rows, table


def describe_trainers(plan: Plan, store: RunStore) -> str:
    """Count the plan's stored networks per trainer, e.g. ``fused G=4 x 6, single x 2``."""
    counts = Counter(store.record(job.key).get("trainer", "single") for job in plan.jobs if store.has(job.key))
    return ", ".join(f"{trainer} x {n}" for trainer, n in sorted(counts.items())) or "none yet"


def report_paths(store: RunStore) -> tuple[Path, Path]:
    return store.root / "summary.csv", store.root / "table.md"
