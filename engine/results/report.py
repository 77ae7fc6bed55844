"""Write ``summary.csv`` and ``table.md`` of a run from its stored records."""

from __future__ import annotations

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


def report_paths(store: RunStore) -> tuple[Path, Path]:
    return store.root / "summary.csv", store.root / "table.md"
