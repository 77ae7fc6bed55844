"""Run a plan: train every job not yet in the store, N1 before the N2 that need it.

An executor trains a list of jobs and yields ``(job, record, predictions)`` as each
network finishes. The runner saves each result at once, so a killed run loses at
most the trainings in progress. The in-process executor trains on one device,
fusing networks of one architecture where that was measured to pay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from tqdm import tqdm

from engine.experiments.deadline import Deadline, TimeUp, admit_jobs
from engine.experiments.dispatch import run_jobs
from engine.experiments.jobs import DataContext, run_job
from engine.experiments.plan import NetworkJob, Plan
from engine.fused.strategy import GroupChoice
from engine.fused.trainer import FusedOptions
from engine.results.store import RunStore
from engine.training.autotune import TuneResult
from engine.training.execution import ExecutionOptions

log = logging.getLogger(__name__)

JobResult = tuple[NetworkJob, dict[str, Any], dict[str, np.ndarray]]


class Executor(Protocol):
    """Trains jobs and yields each result as soon as its network has finished."""

    def run(self, jobs: list[NetworkJob], parent_d2: Mapping[str, np.ndarray]) -> Iterator[JobResult]: ...

    def describe(self) -> dict[str, Any]: ...


class InProcessExecutor:
    """Train on one device in this process, in fused groups or lanes where they pay.

    ``run`` also takes N2 jobs as ``children`` of N1 jobs in the same call, so lanes
    start each N2 as soon as its N1 is done.
    """

    trains_children = True

    def __init__(
        self,
        data: DataContext,
        device: torch.device,
        options: FusedOptions | None = None,
        execution: ExecutionOptions | None = None,
    ) -> None:
        self.data = data
        self.device = device
        self.options = options or FusedOptions()
        # None trains as a plain eager loop and measures only the group size.
        self.execution = execution
        self.choices: list[GroupChoice] = []
        self.tuning: list[TuneResult] = []

    def run(
        self,
        jobs: list[NetworkJob],
        parent_d2: Mapping[str, np.ndarray],
        stop: Callable[[], bool] | None = None,
        children: Sequence[NetworkJob] = (),
    ) -> Iterator[JobResult]:
        """Train ``jobs``, then ``children`` (N2 of those jobs) as their parents finish.

        ``stop`` is called after every epoch, and True abandons the trainings with
        ``TimeUp``. A child whose parent failed is not trained and yields nothing.
        """
        labels = dict(parent_d2)
        # Checkpointed N1 (learning curves) keep per-epoch predictions, which only the
        # one-network trainer records. They train here one after another, not in lanes.
        alone = None if self.execution is None else dataclasses.replace(self.execution, lanes=1)
        for job in jobs:
            if job.checkpoints:
                record, predictions = run_job(job, self.data, self.device, labels.get(job.key), alone, stop)
                if record["status"] == "ok":
                    for child in children:
                        if child.parent == job.key:
                            labels[child.key] = predictions[child.parent_d2_name]
                yield job, record, predictions
        rest = [job for job in jobs if not job.checkpoints]
        yield from run_jobs(
            rest, self.data, self.device, labels, self.options, self.choices.append,
            execution=self.execution, on_tune=self.tuning.append, stop=stop, children=children,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "executor": "in-process",
            "device": str(self.device),
            "fused": self.options.to_dict(),
            "execution": None if self.execution is None else self.execution.to_dict(),
            "group_choices": [choice.to_dict() for choice in self.choices],
            "autotune": [result.to_dict() for result in self.tuning],
        }


@dataclass
class RunReport:
    """Summary of one invocation: jobs trained, reused from the store, failed or blocked."""

    trained: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)  # N2 whose N1 failed
    # Jobs a time budget left out: not started because they would not have ended in
    # time, or not reached before the budget's hard limit. An N2 whose N1 is one of
    # them is listed here too.
    not_computed: list[str] = field(default_factory=list)
    wall_time_s: float = 0.0


def _format_job_line(job: NetworkJob, record: dict) -> str:
    status = record["stop_reason"] if record["status"] == "ok" else f"FAILED ({record['failure']})"
    return (
        f"{job.describe():<58} epochs {record['epochs']:>3}  "
        f"train error {record['final_train_error']:.3f}  {status}  {record['wall_time_s']:.1f}s  "
        f"[{record.get('trainer', 'single')}]"
    )


def _parents_ready(jobs: Iterable[NetworkJob], store: RunStore, report: RunReport) -> tuple[list[NetworkJob], dict]:
    """Keep the N2 jobs whose N1 finished ok, with that N1's predictions on D2."""
    ready, parent_d2 = [], {}
    for job in jobs:
        if store.has(job.parent) and store.record(job.parent)["status"] == "ok":
            parent_d2[job.key] = store.predictions(job.parent)[job.parent_d2_name]
            ready.append(job)
        else:
            report.blocked.append(job.key)
    return ready, parent_d2


def run_plan(
    plan: Plan,
    store: RunStore,
    executor: Executor,
    progress: bool = True,
    deadline: Deadline | None = None,
    estimates: Mapping[str, float] | None = None,
) -> RunReport:
    """Train the plan's missing jobs, saving each network as soon as it finishes.

    Jobs already in the store are skipped, so rerunning a killed command resumes
    it. An N2 whose N1 failed is not trained and is listed as blocked. Without a
    ``deadline``, an executor that takes ``children`` (the in-process one) gets N1
    and N2 in one call and starts each N2 when its N1 is done; others get every N1
    first, then every N2.

    With a ``deadline`` (a time budget), each role's jobs go to the executor one
    kind (model and batch size) at a time, and a kind starts only with the jobs whose
    ``estimates`` (seconds by key), scaled by the pace measured so far, end within the
    budget. Networks in progress when the budget's hard limit passes are abandoned
    at their next epoch's end (cut off before the stop rule, they would not be
    comparable), and no further network starts. Jobs left out are listed in
    ``RunReport.not_computed``. The executor must accept ``stop`` in its ``run``.
    """
    report = RunReport()
    started = time.perf_counter()
    report.reused = [job.key for job in plan.jobs if store.has(job.key)]
    if report.reused:
        log.info("reusing %d trained networks from %s", len(report.reused), store.root)
    pending = [job for job in plan.jobs if not store.has(job.key)]
    job_seconds = estimates or {}
    bar = tqdm(total=len(pending), desc=plan.recipe.name, unit="net", disable=not progress, file=sys.stderr)

    def save_all(jobs: list[NetworkJob], parent_d2: Mapping[str, np.ndarray]) -> None:
        if deadline is None:
            _save_stream(executor.run(jobs, parent_d2))
            return
        for kind in _kinds(jobs):
            if deadline.past_hard_limit():
                admitted, left = [], kind
            else:
                admitted, left = admit_jobs(kind, job_seconds, deadline)
            _leave_out(left)
            if not admitted:
                continue
            began = deadline.elapsed()
            results = executor.run(admitted, parent_d2, stop=deadline.past_hard_limit)  # type: ignore[call-arg]
            saved = _save_stream(results, stop=deadline.past_hard_limit)
            deadline.record(sum(job_seconds.get(key, 0.0) for key in saved), deadline.elapsed() - began)
            _leave_out([job for job in admitted if job.key not in saved])

    def _leave_out(jobs: Iterable[NetworkJob]) -> None:
        for job in jobs:
            report.not_computed.append(job.key)
            bar.update(1)

    def _save_stream(results: Iterator[JobResult], stop: Callable[[], bool] | None = None) -> set[str]:
        # closing() stops the executor's work at once (for Ray: cancels its tasks) when
        # a save fails, the run is interrupted or the budget is spent, instead of at
        # garbage collection.
        saved = set()
        with contextlib.closing(results):
            try:
                for job, record, predictions in results:
                    _save(job, record, predictions)
                    saved.add(job.key)
                    if stop is not None and stop():
                        log.warning("time limit reached: no further network is started")
                        break
            except TimeUp as exc:
                log.warning("%s; the networks in training are not saved", exc)
        return saved

    def _save(job: NetworkJob, record: dict, predictions: dict) -> None:
        store.save(job.key, record, predictions)
        (report.failed if record["status"] != "ok" else report.trained).append(job.key)
        line = _format_job_line(job, record)
        bar.write(line) if progress else log.info(line)
        bar.update(1)

    if deadline is None and getattr(executor, "trains_children", False):
        _run_together(pending, store, report, _save_stream, executor)  # type: ignore[arg-type]
        bar.update(len(report.blocked))
        bar.close()
        report.wall_time_s = time.perf_counter() - started
        return report
    save_all([job for job in pending if job.role == "n1"], {})
    # An N2 whose N1 the budget left out is left out too.
    skipped_parents = set(report.not_computed)
    n2_pending = [job for job in pending if job.role == "n2" and job.parent not in skipped_parents]
    _leave_out(job for job in pending if job.role == "n2" and job.parent in skipped_parents)
    n2_ready, parent_d2 = _parents_ready(n2_pending, store, report)
    bar.update(len(report.blocked))
    save_all(n2_ready, parent_d2)
    bar.close()
    report.wall_time_s = time.perf_counter() - started
    return report


def _run_together(
    pending: list[NetworkJob],
    store: RunStore,
    report: RunReport,
    save_stream: Callable[[Iterator[JobResult]], set[str]],
    executor: InProcessExecutor,
) -> None:
    """Train N1 and N2 in one executor call, each N2 as a child of its N1 still to train.

    An N2 whose N1 is already stored trains from the start (or is blocked when that
    N1 failed), and one whose N1 fails in this call is listed as blocked.
    """
    n1 = [job for job in pending if job.role == "n1"]
    training = {job.key for job in n1}
    ready, children, parent_d2 = [], [], {}
    for job in pending:
        if job.role != "n2":
            continue
        if job.parent in training:
            children.append(job)
        elif store.has(job.parent) and store.record(job.parent)["status"] == "ok":
            parent_d2[job.key] = store.predictions(job.parent)[job.parent_d2_name]
            ready.append(job)
        else:
            report.blocked.append(job.key)
    save_stream(executor.run([*n1, *ready], parent_d2, children=children))
    report.blocked.extend(job.key for job in children if not store.has(job.key))


def _kinds(jobs: list[NetworkJob]) -> list[list[NetworkJob]]:
    """Group jobs by (model, batch size), in their order of first appearance."""
    kinds: dict[tuple[str, int], list[NetworkJob]] = {}
    for job in jobs:
        kinds.setdefault((job.model, job.train.batch_size), []).append(job)
    return list(kinds.values())
