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
    """Count the plan's stored networks per trainer and options, e.g. ``fused G=4 x 6, single (channels_last) x 2``."""
    counts = Counter(_trainer_label(store.record(job.key)) for job in plan.jobs if store.has(job.key))
    return ", ".join(f"{trainer} x {n}" for trainer, n in sorted(counts.items())) or "none yet"


def describe_threads(plan: Plan, store: RunStore) -> str | None:
    """Return the CPU thread counts the plan's stored networks trained with, e.g. ``1`` or ``1, 2``."""
    counts = {store.record(job.key).get("threads") for job in plan.jobs if store.has(job.key)}
    counts.discard(None)
    return ", ".join(str(count) for count in sorted(counts)) or None


def _trainer_label(record: dict) -> str:
    """Return the trainer of a record with the execution options that differ from a plain eager loop."""
    execution = record.get("execution") or {}
    details = []
    if execution.get("loader", "tensor") != "tensor":
        details.append(f"{execution['loader']} loader")
    if execution.get("channels_last"):
        details.append("channels_last")
    if execution.get("compile") not in (None, "off"):
        details.append(f"compile {execution['compile']}")
    if (execution.get("lanes") or 1) > 1:
        details.append(f"{execution['lanes']} lanes")
    trainer = record.get("trainer", "single")
    return f"{trainer} ({', '.join(details)})" if details else trainer


def report_paths(store: RunStore) -> tuple[Path, Path]:
    return store.root / "summary.csv", store.root / "table.md"
