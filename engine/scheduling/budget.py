"""Fit a recipe's grid into a wall-clock budget: parse it, plan the largest protocol that fits, enforce it.

The planner keeps the stop rule and shrinks the data first. It trains on the full
splits when their estimated time fits the budget, else on the largest class-balanced
subset that fits, down to ``FLOOR_PER_CLASS`` images per class. Only when even that
subset does not fit does it lower the epoch cap, and the table then marks every cell
with runs stopped at the cap. When a cap of ``MIN_EPOCH_CAP`` does not fit either,
it trains nothing and raises :class:`BudgetError` with the budget the grid needs.

An estimate is, per network, epochs x steps per epoch x seconds per step plus its
predictions on D2 and D3 (see ``engine.scheduling.calibration``), summed over the
networks not yet in the store, plus the calibration itself and a fixed overhead.
It must fit in ``SAFETY`` of the budget. During the run a :class:`Deadline` decides
before each group of jobs whether it still fits; jobs that do not are reported as
not computed.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Mapping, NoReturn, Sequence

import torch

from engine.errors import UsageError
from engine.experiments.deadline import TOLERANCE
from engine.experiments.jobs import DataContext
from engine.experiments.plan import NetworkJob, Plan, build_plan
from engine.experiments.recipes import Recipe
from engine.fused.trainer import FusedOptions
from engine.models.registry import InputSpec
from engine.results.store import RunStore
from engine.scheduling.calibration import Calibration, FinishedRun, calibrate, estimate_epochs
from engine.training.config import TrainConfig
from engine.training.execution import ExecutionOptions

log = logging.getLogger(__name__)

BUDGET_FORMS = "a duration with a unit: 90s, 30m, 1.5h or 2h10m (units s, m, h)"
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_BUDGET_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smh])")

# The plan's estimated total must fit in this share of the budget, so the rest absorbs
# estimation errors (a shared machine, epochs that vary from seed to seed).
SAFETY = 0.85
# Smallest subset the planner trains on. A grid that does not fit even there raises BudgetError.
FLOOR_PER_CLASS = 50
# Successive candidate subsets shrink by this factor (images per class).
SUBSET_STEP = 0.9
# Epoch caps tried at the floor subset shrink by this factor, down to MIN_EPOCH_CAP.
CAP_STEP = 0.75
MIN_EPOCH_CAP = 20
# Seconds per network outside its training steps and predictions: building the model,
# saving its record and predictions.
JOB_OVERHEAD_S = 0.1
# Seconds per run for the group-size choices the runner still measures, the summary
# and the table.
RUN_OVERHEAD_S = 3.0
# NOTE: an assumed bound on how much faster a fused group trains than one network at
# a time (groups have at most 128 members). When even this speed-up could not make the
# smallest protocol fit, the planner rejects the grid without measuring group sizes.
MAX_FUSED_SPEEDUP = 64.0
# NOTE: assumed bounds, per device type, on how much faster tuned options (layout,
# compilation, threads) and fused groups together train than the plain eager step.
# On a 2-core CPU the benchmarks measured about 1.8x for tuning and 2.1x for fusion.
# On a GPU, fusing many small networks may gain far more, so the bound there is the
# fusion bound times 4. When even this speed-up could not make the smallest protocol
# at the lowest cap fit, the planner rejects the grid after timing only plain steps.
MAX_UNTUNED_SPEEDUP = {"cpu": 16.0}
# Timing of a hopeless grid stops after this many seconds, or after this share of the
# budget if that is longer. The grid is then rejected with a lower bound of its need.
EARLY_REJECT_AFTER_S = 10.0
EARLY_REJECT_SHARE = 0.1
MAX_UNTUNED_SPEEDUP_OTHER = 4 * MAX_FUSED_SPEEDUP


class BudgetError(UsageError):
    """The grid does not fit the budget even at the smallest protocol; ``needed_s`` is the budget it needs."""

    def __init__(self, message: str, needed_s: float) -> None:
        super().__init__(message)
        self.needed_s = needed_s


def parse_budget(text: str) -> float:
    """Parse a duration such as ``90s``, ``30m``, ``1.5h`` or ``2h10m`` into seconds.

    Raises:
        UsageError: the text is not a sum of numbers with units s, m, h, or it is zero.
    """
    compact = text.strip().lower().replace(" ", "")
    parts = _BUDGET_PART.findall(compact)
    if not compact or "".join(number + unit for number, unit in parts) != compact:
        raise UsageError(f"invalid budget {text!r}; give {BUDGET_FORMS}")
    seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    if seconds <= 0:
        raise UsageError(f"budget {text!r} is zero; give {BUDGET_FORMS}")
    return seconds


def format_duration(seconds: float) -> str:
    """Format seconds as ``45s``, ``12m30s`` or ``2h10m``, rounded up; ``parse_budget`` reads it back."""
    if seconds < 60:
        return f"{max(1, math.ceil(seconds))}s"
    if seconds < 3600:
        minutes, rest = divmod(math.ceil(seconds), 60)
        return f"{minutes}m{rest}s" if rest else f"{minutes}m"
    hours, minutes = divmod(math.ceil(seconds / 60), 60)
    return f"{hours}h{minutes}m" if minutes else f"{hours}h"


@dataclass(frozen=True)
class JobEstimate:
    """The estimated cost of one network of the plan (0 s when the store already has it)."""

    key: str
    role: str
    model: str
    regime: str
    seed: int
    n_images: int
    epochs: float
    seconds: float
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["epochs"] = round(self.epochs, 1)
        values["seconds"] = round(self.seconds, 2)
        return values


@dataclass
class BudgetPlan:
    """The protocol chosen for a budget and its estimated time.

    Attributes:
        budget_s: the budget of the whole run, in seconds.
        subset: images per split; None trains on the full splits.
        images_per_split: images of D1 (and of D2) that each network trains on.
        max_epochs: epoch cap of every training; below ``requested_max_epochs`` only
            when the floor subset did not fit otherwise.
        requested_max_epochs: the cap of the recipe or of ``--max-epochs``.
        num_classes: classes of the dataset.
        jobs: one estimate per network of the plan, N1 before N2.
        calibration: the measured step times.
        spent_s: seconds the run had used before planning (loading the data).
        overhead_s: fixed seconds for the run's summary and table.
        safety: share of the budget the estimated total had to fit in.
        tried: each candidate protocol with its estimated total, largest first.
    """

    budget_s: float
    subset: int | None
    images_per_split: int
    max_epochs: int
    requested_max_epochs: int
    num_classes: int
    jobs: list[JobEstimate]
    calibration: Calibration
    spent_s: float = 0.0
    overhead_s: float = RUN_OVERHEAD_S
    safety: float = SAFETY
    tried: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_jobs(self) -> int:
        return len(self.jobs)

    @property
    def n_to_train(self) -> int:
        return sum(not job.done for job in self.jobs)

    @property
    def training_s(self) -> float:
        return sum(job.seconds for job in self.jobs)

    @property
    def total_s(self) -> float:
        """Estimated wall time of the whole run: before planning, calibration, training, overhead."""
        return self.spent_s + self.calibration.measure_time_s + self.training_s + self.overhead_s

    @property
    def cap_lowered(self) -> bool:
        return self.max_epochs < self.requested_max_epochs

    def job_seconds(self) -> dict[str, float]:
        """Return the estimated seconds of each job by key, for :func:`admit_jobs`."""
        return {job.key: job.seconds for job in self.jobs}

    def train_config(self, train: TrainConfig) -> TrainConfig:
        """Return ``train`` with the plan's epoch cap."""
        return TrainConfig.from_dict({**train.to_dict(), "max_epochs": self.max_epochs})

    def describe(self) -> str:
        """Return a few lines for the terminal: the protocol chosen, why, and the estimated time."""
        n1 = sum(job.role == "n1" for job in self.jobs)
        if self.subset is None:
            scale = f"the full splits ({self.images_per_split} images in D1 and in D2)"
        else:
            per_class = self.subset // self.num_classes
            scale = f"a class-balanced subset of {self.subset} images per split ({per_class} per class)"
        cap = f"epoch cap {self.max_epochs}"
        if self.cap_lowered:
            cap += f", lowered from {self.requested_max_epochs} (cells with runs stopped at the cap are marked)"
        fixed_s = self.spent_s + self.calibration.measure_time_s + self.overhead_s

        lines = [
            f"budget {format_duration(self.budget_s)}: training on {scale}, {cap}; the estimate may take "
            f"{100 * self.safety:.0f}% of the budget ({format_duration(self.safety * self.budget_s)}), the rest "
            "absorbs estimation errors.",
            f"  {self.n_jobs} networks ({n1} N1 + {self.n_jobs - n1} N2), {self.n_jobs - self.n_to_train} already "
            f"trained; estimated {format_duration(self.total_s)} ({100 * self.total_s / self.budget_s:.0f}% of the "
            f"budget): {format_duration(self.training_s)} training, {format_duration(fixed_s)} start-up, "
            f"calibration and overhead.",
        ]

        # The full splits, and the smallest protocol that did not fit, if it is another.
        too_large = [candidate for candidate in self.tried if not candidate["fits"]]
        listed = too_large[:1]
        if len(too_large) > 1:
            listed.append(too_large[-1])
        for candidate in listed:
            described = _describe_candidate(candidate, self.num_classes)
            lines.append(f"  {described} would take about {format_duration(candidate['total_s'])}.")

        pending = [job for job in self.jobs if not job.done]
        if pending:
            longest = max(pending, key=lambda job: job.seconds)
            lines.append(
                f"  longest network: {longest.role.upper()} {longest.model} {longest.regime}, "
                f"~{longest.epochs:.0f} epochs, ~{format_duration(longest.seconds)}."
            )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as JSON-ready values, for saving as ``budget.json`` beside the results."""
        return {
            "budget_s": round(self.budget_s, 1),
            "subset": self.subset,
            "images_per_split": self.images_per_split,
            "max_epochs": self.max_epochs,
            "requested_max_epochs": self.requested_max_epochs,
            "cap_lowered": self.cap_lowered,
            "jobs": self.n_jobs,
            "jobs_to_train": self.n_to_train,
            "estimated_total_s": round(self.total_s, 1),
            "estimated_training_s": round(self.training_s, 1),
            "spent_before_planning_s": round(self.spent_s, 1),
            "overhead_s": self.overhead_s,
            "safety": self.safety,
            "calibration": self.calibration.to_dict(),
            "tried": self.tried,
            "job_estimates": [job.to_dict() for job in self.jobs],
        }


def _describe_candidate(candidate: Mapping[str, Any], num_classes: int) -> str:
    if candidate["subset"] is None:
        return "the full splits"
    return f"{candidate['subset'] // num_classes} images per class at epoch cap {candidate['max_epochs']}"


# -- the planner -------------------------------------------------------------------


def finished_runs(store: RunStore, full_split_size: int) -> list[FinishedRun]:
    """Read the store's finished trainings, to refine the epoch estimates."""
    runs = []
    for key in store.keys():
        run = FinishedRun.from_record(store.record(key), full_split_size)
        if run is not None:
            runs.append(run)
    return runs


def _bucket_sizes(jobs: Iterable[NetworkJob]) -> dict[tuple[str, str, int], int]:
    """Count jobs per (role, model, batch size), the jobs the runner gives the executor in one call.

    Checkpointed N1 (learning curves) train one at a time and are left out.
    """
    sizes: dict[tuple[str, str, int], int] = {}
    for job in jobs:
        if job.checkpoints:
            continue
        key = (job.role, job.model, job.train.batch_size)
        sizes[key] = sizes.get(key, 0) + 1
    return sizes


def estimate_jobs(
    plan: Plan,
    calibration: Calibration,
    images_per_split: int,
    d3_images: int,
    num_classes: int,
    store: RunStore | None = None,
    finished: Sequence[FinishedRun] = (),
) -> list[JobEstimate]:
    """Estimate every job of ``plan``: epochs to the stop rule and seconds on the calibrated device.

    A job already in ``store`` costs nothing. A job's predictions on D2 and D3 (and at
    each checkpoint epoch), and the evaluation pass of an exact training error per
    epoch, are counted as forward passes.
    """
    pending = [job for job in plan.jobs if store is None or not store.has(job.key)]
    buckets = _bucket_sizes(pending)
    estimates = []
    for job in plan.jobs:
        batch = job.train.batch_size
        epochs = estimate_epochs(
            job.model, job.regime, job.role, images_per_split, num_classes,
            max_epochs=job.train.max_epochs, finished_records=finished,
        )
        done = store is not None and store.has(job.key)
        seconds = 0.0
        if not done:
            bucket = 1 if job.checkpoints else buckets[job.role, job.model, batch]
            seconds = calibration.training_seconds(job.model, batch, images_per_split, epochs, bucket)
            predictions = (1 + len(job.checkpoints)) * (images_per_split + d3_images)
            if job.train.exact_train_error:
                predictions += math.ceil(epochs) * images_per_split
            seconds += calibration.prediction_seconds(job.model, batch, predictions) + JOB_OVERHEAD_S
        estimates.append(JobEstimate(
            job.key, job.role, job.model, job.regime, job.seed, images_per_split, epochs, seconds, done,
        ))
    return estimates


def _subset_candidates(limit: int, num_classes: int, floor_per_class: int) -> list[int]:
    """Class-balanced subset sizes from the largest a split allows down to the floor, geometrically."""
    per_class = limit // num_classes
    sizes = []
    while per_class > floor_per_class:
        sizes.append(per_class * num_classes)
        per_class = min(per_class - 1, int(per_class * SUBSET_STEP))
    sizes.append(floor_per_class * num_classes)
    return sizes


def _cap_candidates(max_epochs: int) -> list[int]:
    """Epoch caps below ``max_epochs``, shrinking by ``CAP_STEP``, down to ``MIN_EPOCH_CAP``."""
    caps = []
    cap = int(max_epochs * CAP_STEP)
    while cap > MIN_EPOCH_CAP:
        caps.append(cap)
        cap = int(cap * CAP_STEP)
    if max_epochs > MIN_EPOCH_CAP:
        caps.append(MIN_EPOCH_CAP)
    return caps


def _fused_buckets(
    recipe: Recipe,
    train: TrainConfig,
    options: FusedOptions | None,
    execution: ExecutionOptions | None,
    device: torch.device | str,
) -> dict[tuple[str, int], list[int]]:
    """Return the bucket sizes per (model, batch size), or none when the run trains one network at a time.

    As in the runner: a fixed group size 1, a loader other than ``tensor``, autotuning
    off without a group size, and fp16 on CUDA train one network at a time.
    """
    if options is not None and options.group_size == 1:
        return {}
    if execution is not None and execution.loader != "tensor":
        return {}
    if execution is not None and not execution.autotune and (options is None or options.group_size is None):
        return {}
    if train.precision == "fp16" and torch.device(device).type == "cuda":
        return {}
    buckets: dict[tuple[str, int], list[int]] = {}
    for (_, model, batch), size in _bucket_sizes(build_plan(recipe, train, None).jobs).items():
        buckets.setdefault((model, batch), []).append(size)
    return buckets


def _lane_buckets(
    recipe: Recipe, train: TrainConfig, execution: ExecutionOptions | None, device: torch.device | str
) -> dict[tuple[str, int], list[int]]:
    """Return the bucket sizes per (model, batch size) where the runner may train in lanes: on a CPU with options."""
    if execution is None or torch.device(device).type != "cpu" or execution.lanes == 1:
        return {}
    buckets: dict[tuple[str, int], list[int]] = {}
    for (_, model, batch), size in _bucket_sizes(build_plan(recipe, train, None).jobs).items():
        buckets.setdefault((model, batch), []).append(size)
    return buckets


@dataclass
class _Estimator:
    """Everything a candidate protocol's estimate needs, gathered once per planning."""

    recipe: Recipe
    train: TrainConfig
    budget_s: float
    data_ctx: DataContext
    store: RunStore | None
    calibration: Calibration
    finished: list[FinishedRun]
    spent_s: float
    safety: float

    @property
    def num_classes(self) -> int:
        return self.data_ctx.dataset.num_classes

    def plan(self, subset: int | None, max_epochs: int, tried: list[dict[str, Any]]) -> BudgetPlan:
        """Estimate the run at ``subset`` images per split (None: the full splits) and epoch cap ``max_epochs``."""
        full = self.data_ctx.split(0, None)
        n = len(full.d1) if subset is None else subset
        d3 = len(full.d3) if subset is None else subset
        capped = TrainConfig.from_dict({**self.train.to_dict(), "max_epochs": max_epochs})
        plan = build_plan(self.recipe, capped, subset)
        if not self.calibration.complete:
            plan = _timed_jobs(plan, self.calibration)
        jobs = estimate_jobs(plan, self.calibration, n, d3, self.num_classes, self.store, self.finished)
        return BudgetPlan(
            self.budget_s, subset, n, max_epochs, self.train.max_epochs, self.num_classes, jobs,
            self.calibration, self.spent_s, safety=self.safety, tried=tried,
        )


def _calibrate_for(
    recipe: Recipe,
    train: TrainConfig,
    device: torch.device | str,
    spec: InputSpec,
    options: FusedOptions | None,
    floor_training_s: Callable[[Calibration, int], float],
    budget_s: float,
    execution: ExecutionOptions | None,
    floor: int,
) -> Calibration:
    """Measure the step times of the recipe's models, and the fused speed-ups where they could matter.

    With ``execution``, the steps are timed under the options autotuning picks for
    the run, which weighs compilation against the steps of the smallest protocol.
    """
    floor_plan = build_plan(recipe, train, floor)
    planned: dict[tuple[str, int], int] = {}
    for job in floor_plan.jobs:
        key = (job.model, job.train.batch_size)
        planned[key] = planned.get(key, 0) + math.ceil(floor / job.train.batch_size) * job.train.max_epochs
    # The plain eager step first, one (model, batch size) pair at a time. Once the
    # pairs timed so far could not fit the smallest protocol even at the fastest
    # options, the planner rejects the grid without timing the rest. It stops early
    # only after timing for a while, so that a cheap grid still gets the full estimate.
    bound = MAX_UNTUNED_SPEEDUP.get(torch.device(device).type, MAX_UNTUNED_SPEEDUP_OTHER)
    patience_s = max(EARLY_REJECT_AFTER_S, EARLY_REJECT_SHARE * budget_s)

    def hopeless(timed: Calibration) -> bool:
        too_slow = floor_training_s(timed, min(MIN_EPOCH_CAP, train.max_epochs)) / bound > budget_s
        return too_slow and (timed.measure_time_s >= patience_s or len(timed.speeds) == len(planned))

    plain = _calibrate_pairs(planned, spec, device, train.precision, {}, stop=hopeless)
    if hopeless(plain):
        return plain
    tuning = {
        "execution": execution, "planned_steps": planned,
        "lane_buckets": _lane_buckets(recipe, train, execution, device),
    }
    calibration = _calibrate_pairs(planned, spec, device, train.precision, tuning)
    calibration.measure_time_s += plain.measure_time_s
    buckets = _fused_buckets(recipe, train, options, execution, device)
    fusable = any(size > 1 for sizes in buckets.values() for size in sizes)
    if not fusable or floor_training_s(calibration, train.max_epochs) / MAX_FUSED_SPEEDUP > budget_s:
        return calibration
    fused = _calibrate_pairs(planned, spec, device, train.precision, {
        **tuning, "fused_buckets": buckets, "share_batches": bool(options and options.share_batches),
        "group_size": options.group_size if options else None,
    })
    fused.measure_time_s += calibration.measure_time_s
    return fused


def _calibrate_pairs(
    pairs: Collection[tuple[str, int]],
    spec: InputSpec,
    device: torch.device | str,
    precision: str,
    arguments: Mapping[str, Any],
    stop: Callable[[Calibration], bool] | None = None,
) -> Calibration:
    """Calibrate each (model, batch size) pair the plan trains, and no other combination.

    ``stop`` is called after each pair with the calibration so far. When it returns
    True, the remaining pairs are not timed and the result is marked incomplete.
    """
    merged = Calibration(str(torch.device(device)), {})
    for model, batch in sorted(pairs):
        part = calibrate([model], spec, [batch], device, precision=precision, **arguments)
        merged.speeds.update(part.speeds)
        merged.measure_time_s += part.measure_time_s
        merged.tuned = part.tuned
        if stop is not None and stop(merged):
            break
    merged.complete = len(merged.speeds) == len(pairs)
    return merged


def _timed_jobs(plan: Plan, calibration: Calibration) -> Plan:
    """Return ``plan`` with only the jobs whose (model, batch size) ``calibration`` has timed."""
    timed = [job for job in plan.jobs if (job.model, job.train.batch_size) in calibration.speeds]
    return dataclasses.replace(
        plan, n1_jobs=[job for job in timed if job.role == "n1"], n2_jobs=[job for job in timed if job.role == "n2"]
    )


def plan_within_budget(
    recipe: Recipe,
    train: TrainConfig,
    budget_s: float,
    device: torch.device | str,
    store: RunStore | None,
    data_ctx: DataContext,
    *,
    options: FusedOptions | None = None,
    calibration: Calibration | None = None,
    spent_s: float = 0.0,
    safety: float = SAFETY,
    floor_per_class: int = FLOOR_PER_CLASS,
    execution: ExecutionOptions | None = None,
) -> BudgetPlan:
    """Choose the largest protocol of ``recipe`` whose estimated run fits ``safety`` x ``budget_s``.

    Args:
        recipe: the (narrowed) grid.
        train: the protocol; its ``max_epochs`` is the highest cap the plan may use.
        budget_s: wall-clock budget of the whole run, in seconds.
        device: where the run trains (calibrated here unless ``calibration`` is given).
        store: the run directory, or None for a new one; networks already in it
            cost nothing, and its finished records refine the epoch estimates.
        data_ctx: the run's dataset, for the split sizes and the class count.
        options: the run's fused-training options; unless they fix group size 1,
            the fused group sizes are measured here as the runner would.
        calibration: step times measured before (tests inject fake ones).
        spent_s: seconds the run used before planning (counted in the total).
        safety: share of the budget the estimated total must fit in.
        floor_per_class: the smallest subset, in images per class.
        execution: the run's execution options, timed as the runner will use them
            (None: the plain eager loop).

    Candidates, largest first: the full splits, then class-balanced subsets shrinking
    by ``SUBSET_STEP`` down to ``floor_per_class`` images per class; the first that
    fits wins. If none does, the cap is lowered at the floor subset by ``CAP_STEP``
    at a time, down to ``MIN_EPOCH_CAP``.

    Raises:
        BudgetError: nothing fits; the message gives the budget the floor subset
            needs at the requested cap.
    """
    num_classes = data_ctx.dataset.num_classes
    full = data_ctx.split(0, None)
    finished = finished_runs(store, len(full.d1)) if store is not None else []
    floor = floor_per_class * num_classes
    if calibration is None:

        def floor_training_s(measured: Calibration, cap: int) -> float:
            """Estimate the floor subset's training at ``cap``, over the jobs whose steps were timed."""
            capped = TrainConfig.from_dict({**train.to_dict(), "max_epochs": cap})
            plan = _timed_jobs(build_plan(recipe, capped, floor), measured)
            return sum(job.seconds for job in estimate_jobs(plan, measured, floor, floor, num_classes, store, finished))

        calibration = _calibrate_for(
            recipe, train, device, data_ctx.dataset.spec, options, floor_training_s, budget_s, execution, floor
        )
    estimator = _Estimator(recipe, train, budget_s, data_ctx, store, calibration, finished, spent_s, safety)
    if execution is not None and not calibration.tuned:
        # Only the plain step was timed: even the fastest options could not fit.
        _reject(estimator, floor, floor_per_class, train.max_epochs, budget_s, safety, calibration)

    # A subset draws its images from each split, D3 included.
    limit = min(len(full.d1), len(full.d3))
    candidates: list[tuple[int | None, int]] = [(None, train.max_epochs)]
    candidates += [(size, train.max_epochs) for size in _subset_candidates(limit, num_classes, floor_per_class)]
    candidates += [(floor, cap) for cap in _cap_candidates(train.max_epochs)]
    tried: list[dict[str, Any]] = []
    for subset, cap in candidates:
        budget_plan = estimator.plan(subset, cap, tried)
        fits = budget_plan.total_s <= safety * budget_s
        if fits and subset is not None and not _split_exists(data_ctx, subset):
            continue
        tried.append({"subset": subset, "max_epochs": cap, "total_s": round(budget_plan.total_s, 1), "fits": fits})
        if fits:
            log.info("budget plan: subset %s, cap %d, estimated %.0f s of %.0f s", subset, cap, budget_plan.total_s, budget_s)
            return budget_plan

    _reject(estimator, floor, floor_per_class, train.max_epochs, budget_s, safety, calibration)


def _reject(
    estimator: _Estimator, floor: int, floor_per_class: int, max_epochs: int, budget_s: float, safety: float,
    calibration: Calibration,
) -> NoReturn:
    """Raise ``BudgetError`` with the budget the floor subset needs at the requested cap, and at the lowest cap.

    The first lets every network reach the stop rule by the estimate, so the message
    suggests it. The second is the minimum the planner accepts, with
    the cells of capped runs marked.
    """
    needed = estimator.plan(floor, max_epochs, []).total_s / safety
    lowest_cap = min(MIN_EPOCH_CAP, max_epochs)
    least = estimator.plan(floor, lowest_cap, []).total_s / safety
    timed = ", timed as a plain eager loop," if not calibration.tuned else ""
    if not calibration.complete:
        pairs = ", ".join(f"{model} at batch {batch}" for model, batch in sorted(calibration.speeds))
        raise BudgetError(
            f"the grid needs more than {format_duration(needed)} at {floor_per_class} images per class and epoch "
            f"cap {max_epochs} (more than {format_duration(least)} with the cap lowered to {lowest_cap}): the "
            f"networks of {pairs} alone need that, timed as a plain eager loop, so the rest was not timed; "
            f"narrow the grid or give a budget well above {format_duration(needed)}",
            needed,
        )
    at_lowest = ""
    if lowest_cap < max_epochs:
        at_lowest = f" (at least {format_duration(least)} with the epoch cap lowered to {lowest_cap}, cells marked)"
    raise BudgetError(
        f"the grid needs about {format_duration(needed)}{timed} at {floor_per_class} images per class and epoch cap "
        f"{max_epochs}{at_lowest}, more than the budget of {format_duration(budget_s)}; "
        f"give --budget {format_duration(needed)} or narrow the grid",
        needed,
    )


def _split_exists(data_ctx: DataContext, subset: int) -> bool:
    """Return whether every split contains ``subset`` class-balanced images (MNIST's rarest test class limits it)."""
    try:
        data_ctx.split(0, subset)
    except UsageError:
        return False
    return True


def report_usage(plan: BudgetPlan, used_s: float, not_computed: int = 0) -> str:
    """Return one line comparing the planned with the used time of a run."""
    error = 100.0 * (plan.total_s - used_s) / used_s if used_s > 0 else 0.0
    side = "above" if error >= 0 else "below"
    line = (
        f"budget {format_duration(plan.budget_s)}: planned {format_duration(plan.total_s)}, "
        f"used {format_duration(used_s)} ({100 * used_s / plan.budget_s:.0f}% of the budget; "
        f"the estimate was {abs(error):.0f}% {side} the time used)"
    )
    if used_s > plan.budget_s * (1.0 + TOLERANCE):
        line += f"; over the budget by more than {100 * TOLERANCE:.0f}%"
    if not_computed:
        line += (
            f"; {not_computed} networks not computed for lack of time (the same command run again "
            "trains them and reuses the networks already trained)"
        )
    return line
