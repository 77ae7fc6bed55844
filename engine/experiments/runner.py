"""Run a plan: train every job not yet in the store, N1 before the N2 that need it."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from engine.experiments.jobs import DataContext, run_job
from engine.experiments.plan import NetworkJob, Plan
from engine.results.store import RunStore

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    """What one invocation did: jobs trained, reused from the store, failed or blocked."""

    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # N2 whose N1 failed
    wall_time_s: float = 0.0


def _format_job_line(job: NetworkJob, record: dict) -> str:
    status = record["stop_reason"] if record["status"] == "ok" else f"FAILED ({record['failure']})"
    return (
        f"{job.describe():<58} epochs {record['epochs']:>3}  "
        f"train error {record['final_train_error']:.3f}  {status}  {record['wall_time_s']:.1f}s"
    )


def run_plan(
    plan: Plan,
    store: RunStore,
    data: DataContext,
    device: torch.device,
    progress: bool = True,
) -> RunReport:
    """Train the plan's missing jobs one by one, saving each as soon as it finishes.

    Jobs already in the store are skipped, so rerunning a killed command resumes
    it. An N2 whose N1 failed is not trained and is listed as blocked.
    """
    report = RunReport()
    started = time.perf_counter()
    pending = [job for job in plan.jobs if not store.has(job.key)]
    report.reused = [job.key for job in plan.jobs if store.has(job.key)]
    if report.reused:
        log.info("reusing %d trained networks from %s", len(report.reused), store.root)
    bar = tqdm(total=len(pending), desc=plan.recipe.name, unit="net", disable=not progress, file=sys.stderr)
    for job in pending:
        parent_d2 = None
        if job.parent is not None:
            parent = store.record(job.parent) if store.has(job.parent) else None
            if parent is None or parent["status"] != "ok":
                report.blocked.append(job.key)
                bar.update(1)
                continue
            parent_d2 = store.predictions(job.parent)["d2"]
        bar.set_postfix_str(job.describe(), refresh=True)
        record, predictions = run_job(job, data, device, parent_d2)
        store.save(job.key, record, predictions)
        (report.failed if record["status"] != "ok" else report.trained).append(job.key)
        bar.write(_format_job_line(job, record)) if progress else log.info(_format_job_line(job, record))
        bar.update(1)
    bar.close()
    report.wall_time_s = time.perf_counter() - started
    return report
