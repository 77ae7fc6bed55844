"""Enforce a run's time budget: admit jobs that end in time, stop starting new ones past the limit.

The planner (``engine.scheduling.budget``) estimates each job's seconds. Before each
kind of jobs, the runner uses a :class:`Deadline` to admit the ones that still fit.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Mapping, Sequence, TypeVar

from engine.experiments.plan import NetworkJob

# The run may end this share past the budget: a network in progress when the budget
# is spent may finish, until this limit.
TOLERANCE = 0.10


class TimeUp(Exception):
    """Raised at an epoch's end inside a training once the run's time limit has passed.

    The network in training is not saved: cut off before its stop rule, it would
    not be comparable. The runner lists it as not computed.
    """


class Deadline:
    """The wall-clock budget of a run, counted from its creation less ``elapsed_s``.

    A command line passes ``elapsed_s=seconds_since_process_start()``, so the budget
    also covers the interpreter's start and the imports.

    ``should_start`` admits a job when its estimate, scaled by the pace of the jobs
    finished so far (used / estimated seconds, see :meth:`record`), ends within the
    budget. The run may overrun by ``tolerance`` of the budget while jobs admitted
    in time finish, and :meth:`past_hard_limit` returns whether even that is used up.
    """

    def __init__(
        self,
        budget_s: float,
        tolerance: float = TOLERANCE,
        clock: Callable[[], float] = time.monotonic,
        elapsed_s: float = 0.0,
    ) -> None:
        if not budget_s > 0:
            raise ValueError(f"budget_s={budget_s!r} must be positive")
        self.budget_s = budget_s
        self.tolerance = tolerance
        self.clock = clock
        self.started = clock() - elapsed_s
        self.estimated_s = 0.0
        self.used_s = 0.0

    @property
    def hard_limit_s(self) -> float:
        return self.budget_s * (1.0 + self.tolerance)

    def elapsed(self) -> float:
        return self.clock() - self.started

    def remaining(self) -> float:
        """Return the seconds left until the budget, 0 once it is spent."""
        return max(0.0, self.budget_s - self.elapsed())

    def expired(self) -> bool:
        return self.elapsed() >= self.budget_s

    def past_hard_limit(self) -> bool:
        """Return whether the run is past the budget plus its tolerance."""
        return self.elapsed() >= self.hard_limit_s

    def record(self, estimated_s: float, used_s: float) -> None:
        """Record the estimated and the used seconds of finished work, for :attr:`pace`."""
        self.estimated_s += estimated_s
        self.used_s += used_s

    @property
    def pace(self) -> float:
        """Return used / estimated seconds of the work recorded so far (1 before any), clamped to [0.5, 4]."""
        if self.estimated_s <= 0:
            return 1.0
        return min(4.0, max(0.5, self.used_s / self.estimated_s))

    def should_start(self, estimated_job_s: float) -> bool:
        """Return whether a job estimated at ``estimated_job_s`` would finish within the budget at the current pace."""
        return self.elapsed() + estimated_job_s * self.pace <= self.budget_s


def seconds_since_process_start() -> float:
    """Return the seconds since this process started, from ``/proc`` on Linux (0 where unknown)."""
    try:
        with open("/proc/self/stat") as stat:
            # Field 22 is the start time in clock ticks after boot. Fields from 3 on follow the ")".
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as uptime:
            uptime_s = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))


T = TypeVar("T", bound=NetworkJob)


def admit_jobs(jobs: Sequence[T], estimates: Mapping[str, float], deadline: Deadline) -> tuple[list[T], list[T]]:
    """Split ``jobs`` into the longest prefix that fits the deadline and the jobs not to start.

    The prefix's summed estimate must pass :meth:`Deadline.should_start`, because
    the executor trains the jobs of one call one after another or as one fused group.
    A job without an estimate counts as 0 s.
    """
    total = 0.0
    for count, job in enumerate(jobs):
        total += estimates.get(job.key, 0.0)
        if not deadline.should_start(total):
            return list(jobs[:count]), list(jobs[count:])
    return list(jobs), []
