"""Time one training on this device: step time by calibration, epochs by a fitted model.

A training's time is its epochs to the stop rule times its steps per epoch times the
time of one step. The step time is measured here, on the device, by a short
calibration per architecture. The epochs come from a power law in the number of
training images, fitted to real runs on small CIFAR-10 subsets and refined by the
runs a store has already finished. ``python -m engine.scheduling.calibration``
repeats the survey that fitted the constants.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from engine.fused.modules import is_fusable
from engine.fused.strategy import FUSED_MARGIN, choose_group_size, make_plain_step, measure_throughput, template_model
from engine.models import create_model
from engine.models.registry import InputSpec
from engine.training.autotune import (
    Candidate,
    TuneResult,
    choose_lanes,
    make_step,
    thread_count,
    too_small_to_measure_groups,
    tune_module,
)
from engine.training.config import TrainConfig
from engine.training.execution import ExecutionOptions

log = logging.getLogger(__name__)

# Seconds spent timing one architecture after its warm-up step.
CALIBRATION_S = 0.5
# Timed steps per window of the calibration, at most, because a small network's step
# takes a few milliseconds.
MAX_STEPS = 100
# A warm-up step longer than this many budgets is taken as the step time.
SLOW_STEP_BUDGETS = 4
# A forward pass costs about a third of a training step (forward, backward, update).
FORWARD_SHARE = 0.35

# Seconds per step of one network and its batch-independent part, per (device, model,
# input, batch size, precision).
_STEP_CACHE: dict[tuple, tuple[float, float]] = {}
# Images per second summed over members, per (device, model, input, batch size, group
# size, shared batches, precision).
_FUSED_CACHE: dict[tuple, float] = {}


@dataclass(frozen=True)
class ModelSpeed:
    """Measured training speed of one architecture at one batch size.

    A step of ``b`` images takes ``fixed_s + b / batch_size * (step_s - fixed_s)``
    seconds: a per-step part (kernel launches, the optimizer's Python) and a per-image
    part. An epoch's smaller last batch thus costs less than a full step.

    Attributes:
        model: model name.
        batch_size: minibatch size of the measured steps.
        step_s: seconds per full training step of one network (the one-network trainer).
        fixed_s: the part of ``step_s`` that does not depend on the batch size.
        group_sizes: fused group size chosen per bucket size (jobs of this kind in one
            executor call); absent buckets train one network at a time.
        member_step_s: seconds per step and member in the chosen group, per bucket
            size; with lanes, the seconds per step of the lanes' combined throughput.
        lanes: lanes chosen per bucket size (networks trained at once in threads);
            absent buckets train without lanes. Their member step is the lanes'
            measured step time per network, raised where the bucket leaves lanes idle.
    """

    model: str
    batch_size: int
    step_s: float
    fixed_s: float = 0.0
    group_sizes: dict[int, int] = field(default_factory=dict)
    member_step_s: dict[int, float] = field(default_factory=dict)
    lanes: dict[int, int] = field(default_factory=dict)

    def epoch_seconds(self, n_images: int, bucket_jobs: int = 1) -> float:
        """Return the seconds of one epoch over ``n_images`` when ``bucket_jobs`` such jobs train together."""
        steps = math.ceil(n_images / self.batch_size)
        one_network = steps * self.fixed_s + n_images / self.batch_size * (self.step_s - self.fixed_s)
        return one_network * self.member_step_s_for(bucket_jobs) / self.step_s

    def member_step_s_for(self, bucket_jobs: int) -> float:
        """Return the seconds per step and member for a bucket of ``bucket_jobs``.

        A bucket size that was not measured (a resumed run trains fewer jobs than its
        plan) takes the largest measured bucket below it, else one network at a time.
        """
        if bucket_jobs in self.member_step_s:
            return self.member_step_s[bucket_jobs]
        smaller = [size for size in self.member_step_s if size < bucket_jobs]
        return self.member_step_s[max(smaller)] if smaller else self.step_s

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "batch_size": self.batch_size,
            "step_s": round(self.step_s, 6),
            "fixed_s": round(self.fixed_s, 6),
            "images_per_s": round(self.batch_size / self.step_s, 1),
            "group_sizes": {str(k): v for k, v in sorted(self.group_sizes.items())},
            "member_step_s": {str(k): round(v, 6) for k, v in sorted(self.member_step_s.items())},
            "lanes": {str(k): v for k, v in sorted(self.lanes.items())},
        }


@dataclass
class Calibration:
    """Step times of the architectures of a run on one device, and what measuring them cost."""

    device: str
    speeds: dict[tuple[str, int], ModelSpeed]
    measure_time_s: float = 0.0
    # Whether the steps were timed under the run's execution options (else: plain eager).
    tuned: bool = False
    # False when timing stopped early, so some (model, batch size) pairs of the run are absent.
    complete: bool = True

    def speed(self, model: str, batch_size: int) -> ModelSpeed:
        try:
            return self.speeds[model, batch_size]
        except KeyError:
            measured = ", ".join(f"{m} at batch {b}" for m, b in sorted(self.speeds))
            raise KeyError(f"{model} at batch {batch_size} was not calibrated; calibrated: {measured}") from None

    def training_seconds(self, model: str, batch_size: int, n_images: int, epochs: float, bucket_jobs: int = 1) -> float:
        """Estimate the seconds of ``epochs`` epochs on ``n_images`` images."""
        return epochs * self.speed(model, batch_size).epoch_seconds(n_images, bucket_jobs)

    def prediction_seconds(self, model: str, batch_size: int, n_images: int) -> float:
        """Estimate the seconds of forward passes over ``n_images`` images, in large batches."""
        speed = self.speed(model, batch_size)
        return FORWARD_SHARE * n_images / batch_size * (speed.step_s - speed.fixed_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "measure_time_s": round(self.measure_time_s, 3),
            "tuned": self.tuned,
            "complete": self.complete,
            "speeds": [speed.to_dict() for _, speed in sorted(self.speeds.items())],
        }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_step_seconds(step: Callable[[int], None], device: torch.device, budget_s: float, windows: int) -> float:
    """Return the median over ``windows`` timed windows of their mean step time (at least one step each)."""
    times = []
    count = 1
    for _ in range(windows):
        started = time.perf_counter()
        steps = 0
        while steps == 0 or (time.perf_counter() - started < budget_s / windows and steps < MAX_STEPS):
            step(count)
            count += 1
            steps += 1
        _synchronize(device)
        times.append((time.perf_counter() - started) / steps)
    return statistics.median(times)


def measure_step(
    model: str,
    spec: InputSpec,
    batch_size: int,
    device: torch.device | str,
    precision: str = "fp32",
    budget_s: float = CALIBRATION_S,
    candidate: Candidate | None = None,
) -> tuple[float, float]:
    """Measure one training step of the one-network trainer: its seconds and their batch-independent part.

    ``candidate`` is the layout, compilation and thread count the run trains with
    (see ``engine.training.autotune``); None times the plain eager step.

    The full batch gets one warm-up step, then three windows over three quarters of
    ``budget_s``, at least one step each, on random uint8 images held on the device
    and scaled to [-1, 1] as the loader does. The step time is the median of the
    windows' means. The fastest window, which the group-size choice uses to rank
    candidates, would hide the steady slowdown of a machine shared with other
    processes, which also slows the real training. A batch of ``batch_size // 8`` is
    then timed in the last quarter, and the line through both gives the per-step part.

    A warm-up longer than ``budget_s`` leaves one window and no small batch (the
    per-step part is then taken as 0). One longer than ``SLOW_STEP_BUDGETS * budget_s``
    is the step time itself: its one-time setup is a small share of such a step.
    Results are cached per process, and the global RNG is left as it was.
    """
    device = torch.device(device)
    key = (str(device), model, spec, batch_size, precision, candidate)
    if key in _STEP_CACHE:
        return _STEP_CACHE[key]
    threads = candidate.threads if candidate is not None else torch.get_num_threads()
    with torch.random.fork_rng(devices=[]), thread_count(threads):
        step = _make_step(model, spec, batch_size, device, precision, candidate)
        if candidate is not None and candidate.compile != "off":
            # Compiles (or loads the compiled code): a one-time cost, not a step's.
            step(0)
        started = time.perf_counter()
        step(0)  # allocations and kernel selection happen on the first call
        _synchronize(device)
        warm_up_s = time.perf_counter() - started
        step_s, fixed_s = warm_up_s, 0.0
        if warm_up_s <= SLOW_STEP_BUDGETS * budget_s:
            windows = 1 if warm_up_s > budget_s else 3
            step_s = _median_step_seconds(step, device, 0.75 * budget_s, windows)
        small = batch_size // 8
        if warm_up_s <= budget_s and small >= 1:
            # The trainers run an epoch's smaller last batch eager, so it is timed eager.
            eager = None if candidate is None else dataclasses.replace(candidate, compile="off")
            small_step = _make_step(model, spec, small, device, precision, eager, pool=4 * batch_size)
            small_step(0)
            small_s = _median_step_seconds(small_step, device, 0.25 * budget_s, 1)
            share = small / batch_size
            fixed_s = min(step_s, max(0.0, (small_s - share * step_s) / (1.0 - share)))
    _STEP_CACHE[key] = (step_s, fixed_s)
    return step_s, fixed_s


def _make_step(
    model: str, spec: InputSpec, batch_size: int, device: torch.device, precision: str,
    candidate: Candidate | None, pool: int | None = None,
) -> Callable[[int], None]:
    """Return a training step of one network on random images: the plain one, or under ``candidate``."""
    pool = pool or 4 * batch_size
    if candidate is None:
        return make_plain_step(model, spec, batch_size, device, precision, pool=pool)
    network = create_model(model, spec)
    return make_step(network, candidate, (spec.channels, spec.height, spec.width), batch_size, precision, device)


def clear_cache() -> None:
    """Forget every measured step time and fused throughput, so the next calibration measures again."""
    _STEP_CACHE.clear()
    _FUSED_CACHE.clear()


def calibrate(
    models: Iterable[str],
    dataset_spec: InputSpec,
    batch_sizes: Iterable[int],
    device: torch.device | str,
    *,
    precision: str = "fp32",
    budget_s: float = CALIBRATION_S,
    fused_buckets: Mapping[tuple[str, int], Sequence[int]] | None = None,
    share_batches: bool = False,
    group_size: int | None = None,
    execution: ExecutionOptions | None = None,
    planned_steps: Mapping[tuple[str, int], int] | None = None,
    lane_buckets: Mapping[tuple[str, int], Sequence[int]] | None = None,
) -> Calibration:
    """Measure this device's training speed for every (model, batch size) pair.

    Args:
        models: model names; each is measured at each of ``batch_sizes``.
        dataset_spec: input shape and classes of the run's dataset.
        batch_sizes: minibatch sizes the run trains with.
        device: where the run will train.
        precision: arithmetic of the run's steps.
        budget_s: timing per architecture after a warm-up step (a network whose step
            takes longer is timed for one step).
        fused_buckets: for (model, batch size), the bucket sizes (jobs trained by one
            executor call) of the run. For each the fused group size is chosen here as
            the runner will: measured with the same arguments, so the runner later
            finds the measurements cached, or ``group_size`` when that is fixed. A
            member's step time is then the single step time divided by the fused
            speed-up, timed for ``budget_s`` per group size.
        share_batches: the run's shared-batches option.
        group_size: the run's fixed group size; None measures it.
        execution: the run's execution options. The layout, compilation and threads
            are then chosen by autotuning as the runner will (same cache entries),
            and the step is timed under them; None times the plain eager step.
        planned_steps: training steps per (model, batch size) that autotuning weighs
            a compilation against (default 0: compile only where the user asked).
        lane_buckets: for (model, batch size), the bucket sizes of the run. With
            ``execution``, each bucket gets the lanes the runner will choose
            (``autotune.choose_lanes``), and its member step time becomes the lanes'
            measured step time per network.

    Step times are cached per process, so a second calibration of the same pairs is
    free and ``measure_time_s`` counts only what this call measured.
    """
    device = torch.device(device)
    started = time.perf_counter()
    speeds: dict[tuple[str, int], ModelSpeed] = {}
    for model in dict.fromkeys(models):
        for batch_size in dict.fromkeys(batch_sizes):
            tuned = _tuned_options(
                model, dataset_spec, batch_size, device, precision, execution,
                (planned_steps or {}).get((model, batch_size), 0),
            )
            candidate = tuned.chosen if tuned is not None else None
            cached = (str(device), model, dataset_spec, batch_size, precision, candidate) in _STEP_CACHE
            step_s, fixed_s = measure_step(model, dataset_spec, batch_size, device, precision, budget_s, candidate)
            speed = ModelSpeed(model, batch_size, step_s, fixed_s)
            buckets = (fused_buckets or {}).get((model, batch_size), ())
            if buckets and is_fusable(template_model(model, dataset_spec)):
                with thread_count(candidate.threads if candidate is not None else torch.get_num_threads()):
                    _add_fused_speeds(
                        speed, dataset_spec, device, precision, share_batches, buckets, group_size, budget_s, tuned
                    )
            lane_sizes = (lane_buckets or {}).get((model, batch_size), ())
            if tuned is not None and execution is not None and lane_sizes:
                _add_lane_speeds(speed, tuned, dataset_spec, device, precision, execution, lane_sizes)
            speeds[model, batch_size] = speed
            if not cached:
                timed_as = f"tuned, {candidate.label}" if candidate is not None else "plain eager step"
                log.info(
                    "calibrated %s at batch %d on %s (%s): %.1f ms per step",
                    model, batch_size, device, timed_as, 1e3 * step_s,
                )
    return Calibration(str(device), speeds, time.perf_counter() - started, tuned=execution is not None)


def _tuned_options(
    model: str, spec: InputSpec, batch_size: int, device: torch.device, precision: str,
    execution: ExecutionOptions | None, planned_steps: int,
) -> TuneResult | None:
    """Return the execution options the runner will train ``model`` with (None: the plain eager loop)."""
    if execution is None:
        return None
    if execution.resolved or not execution.autotune:
        return TuneResult("", execution.with_defaults())
    with torch.random.fork_rng(devices=[]):
        network = create_model(model, spec)
    return tune_module(
        network, (spec.channels, spec.height, spec.width), batch_size, precision, device, execution,
        planned_steps=planned_steps, label=model,
    )


def _add_lane_speeds(
    speed: ModelSpeed,
    tuned: TuneResult,
    spec: InputSpec,
    device: torch.device,
    precision: str,
    execution: ExecutionOptions,
    buckets: Sequence[int],
) -> None:
    """Record the lanes the runner will use per bucket, and their step time per network.

    As in ``autotune.tune``, a fused group recorded for the bucket stays only if it
    beats the lanes by ``FUSED_MARGIN``.
    """
    with torch.random.fork_rng(devices=[]):
        network = create_model(speed.model, spec)
    config = TrainConfig(batch_size=speed.batch_size, precision=precision)
    for bucket in sorted(set(buckets)):
        if bucket < 2:
            continue
        result = dataclasses.replace(tuned)
        choose_lanes(
            result, network, (spec.channels, spec.height, spec.width), config, device, execution, bucket, None,
            speed.model, measure_given=True,
        )
        lanes = result.options.lanes or 1
        if lanes == 1 or lanes not in result.lanes_images_per_s:
            continue
        # The lanes' own throughput, not a ratio to the one-network step: the two
        # autotune timings behind a ratio can be far apart on a busy machine. A bucket
        # that does not fill the last round of lanes leaves some lanes idle.
        rounds = math.ceil(bucket / lanes)
        lane_step_s = speed.batch_size / result.lanes_images_per_s[lanes] * rounds * lanes / bucket
        if speed.group_sizes.get(bucket, 1) > 1 and lane_step_s >= FUSED_MARGIN * speed.member_step_s[bucket]:
            continue
        speed.group_sizes.pop(bucket, None)
        speed.lanes[bucket] = lanes
        speed.member_step_s[bucket] = lane_step_s


def _add_fused_speeds(
    speed: ModelSpeed,
    spec: InputSpec,
    device: torch.device,
    precision: str,
    shared: bool,
    buckets: Sequence[int],
    group_size: int | None,
    budget_s: float,
    tuned: TuneResult | None = None,
) -> None:
    """Record the fused group size the runner will use per bucket, and its member step time.

    The size comes from ``choose_group_size``, as in the runner. With ``tuned``
    options, a size that does not beat the tuned one-network throughput by
    ``FUSED_MARGIN`` becomes 1, as in ``autotune.tune``. The timings of
    ``choose_group_size`` (a few steps per size) rank sizes but are too noisy for a
    speed-up: one measured 320 images/s one by one where a step time of 7.4 ms gives
    8,600. So each group size the bucket splits into is timed again here for
    ``budget_s``, and compared with the calibrated one-network step.
    """
    for bucket in sorted(set(buckets)):
        if bucket < 2:
            continue
        if group_size is not None:
            chosen = min(group_size, bucket)
        elif tuned is not None and too_small_to_measure_groups(tuned, speed.batch_size):
            chosen = 1
        else:
            choice = choose_group_size(
                speed.model, spec, speed.batch_size, bucket, device, shared=shared, precision=precision, cache=None,
            )
            chosen = choice.group_size
            single = tuned.images_per_s.get(tuned.chosen.label) if tuned is not None else None
            if chosen > 1 and single is not None and choice.images_per_s.get(chosen, 0.0) < FUSED_MARGIN * single:
                chosen = 1
        if chosen == 1:
            continue
        images_per_s = {
            g: _fused_images_per_s(speed.model, spec, speed.batch_size, g, device, shared, precision, budget_s)
            for g in set(_group_sizes(bucket, chosen)) - {1}
        }
        # The one-network speed is the calibrated step, timed longer and under the run's options.
        images_per_s[1] = speed.batch_size / speed.step_s
        speed.group_sizes[bucket] = chosen
        speed.member_step_s[bucket] = speed.step_s / _bucket_speedup(bucket, chosen, images_per_s)


def _fused_images_per_s(
    model: str, spec: InputSpec, batch_size: int, group_size: int, device: torch.device,
    shared: bool, precision: str, budget_s: float,
) -> float:
    """Return ``measure_throughput`` for one group size, cached per process."""
    key = (str(device), model, spec, batch_size, group_size, shared, precision)
    if key not in _FUSED_CACHE:
        _FUSED_CACHE[key] = measure_throughput(
            model, spec, batch_size, group_size, device, shared=shared, precision=precision, budget_s=budget_s
        )
    return _FUSED_CACHE[key]


def _group_sizes(bucket: int, group_size: int) -> list[int]:
    """Return the sizes of the groups the runner splits a bucket into: the fewest, differing by at most one."""
    count = -(-bucket // group_size)
    base, extra = divmod(bucket, count)
    return [base + 1] * extra + [base] * (count - extra)


def _bucket_speedup(bucket: int, group_size: int, images_per_s: Mapping[int, float]) -> float:
    """Return how much faster a bucket trains in groups of at most ``group_size`` than one by one.

    A group of k members is credited with the throughput of the largest size up to k
    in ``images_per_s`` (images per second summed over members, by group size).
    """
    seconds = 0.0
    for size in _group_sizes(bucket, group_size):
        measured = max(g for g in images_per_s if g <= size)
        seconds += size / images_per_s[measured]
    return bucket / images_per_s[1] / seconds


# -- epochs to the stop rule -------------------------------------------------------


@dataclass(frozen=True)
class EpochLaw:
    """Epochs to the stop rule of one (family, regime, role), as fitted to real runs.

    A share ``stalled`` of the runs never reaches the target error: the plateau rule
    decays their learning rate while they are a few mistakes short of it, so they run
    to the cap. The others stop after ``a * n ** b * scale ** c`` epochs, where ``n``
    is the number of training images and ``scale`` the model's size in its family
    (see :func:`model_family`).
    """

    a: float
    b: float
    c: float = 0.0
    stalled: float = 0.0

    def epochs(self, n_images: int, scale: float, max_epochs: int) -> float:
        """Return the expected epochs of one run under the cap ``max_epochs``."""
        reaching = min(float(max_epochs), max(1.0, self.a * n_images**self.b * scale**self.c))
        return (1.0 - self.stalled) * reaching + self.stalled * max_epochs


# Fitted by ``fit_laws`` to a survey of 138 real trainings on CIFAR-10 subsets. Each N1
# and its N2 share a seed and a width. The commands (each also given ``--data-dir``):
#
#   python -m engine.scheduling.calibration --models shallow_cnn_w16 --subsets 100,500,1000,2000 --out survey.jsonl
#   python -m engine.scheduling.calibration --models shallow_cnn_w32 --subsets 500,1000 --out survey.jsonl
#   python -m engine.scheduling.calibration --models shallow_cnn_w64 --subsets 500 --out survey.jsonl
#   python -m engine.scheduling.calibration --models shallow_cnn_w128 --subsets 500 --regimes true_data --out survey.jsonl
#   python -m engine.scheduling.calibration --models shallow_cnn_w16 --subsets 5000 --seeds 1 \
#       --regimes true_data --out survey.jsonl
#   python -m engine.scheduling.calibration --models mlp_d1_h64,mlp_d3_h64 --subsets 500,1000 --out survey.jsonl
#   python -m engine.scheduling.calibration --fit survey.jsonl
#
# Epochs to the stop rule (seeds 0 and 1; * stopped at the 500-epoch cap; "labels" is
# random_labels and "images" random_images). Epochs do not depend on the machine; these
# ran on a shared 2-core CPU with 1 torch thread:
#
#   model                n  true N1   true N2   labels N1 labels N2 images N1 images N2
#   mlp_d1_h64         500  500* 500* 165 168   230 500*  156 500*  30 35     165 500*
#   mlp_d1_h64        1000  204 500*  123 137   238 500*  155 174   31 38     160 161
#   mlp_d3_h64         500  500* 500* 500* 500* 500* 500* 4 191     201 500*  3 500*
#   mlp_d3_h64        1000  220 234   170 171   284 500*  138 500*  161 500*  191 500*
#   shallow_cnn_w16    100  83 500*   63 500*   500* 500* 500* 500* 27 38     81 500*
#   shallow_cnn_w16    500  142 147   82 95     171 172   99 101    37 40     96 99
#   shallow_cnn_w16   1000  126 143   70 91     171 179   93 100    45 46     96 101
#   shallow_cnn_w16   2000  135 144   88 94     180 187   111 116   54 55     107 107
#   shallow_cnn_w16   5000  169       105       -         -         -         -
#   shallow_cnn_w32    500  115 125   75 76     137 145   80 84     24 27     85 93
#   shallow_cnn_w32   1000  106 123   71 73     154 154   87 94     29 32     83 101
#   shallow_cnn_w64    500  98 100    55 60     127 128   64 68     20 22     61 67
#   shallow_cnn_w128   500  69 76     42 44     -         -         -         -
#
# At 100 images the target (< 1% error) means no mistake at all, and 7 of 12 runs
# stalled short of it while the plateau rule decayed their learning rate, so they ran
# to the cap. From 500 images (the planner's floor) on, no shallow CNN
# stalled, and the epochs barely grow with n (b <= 0.25) but fall with the width
# (c about -0.3). The fit uses runs of at least 500 images. MLPs stall often and
# unpredictably, so their laws are coarse until finished runs refine them.
EPOCH_LAWS: dict[tuple[str, str, str], EpochLaw] = {
    ("mlp", "random_images", "n1"): EpochLaw(33.3491, 0.0, 1.534, 0.25),
    ("mlp", "random_images", "n2"): EpochLaw(161.9857, 0.0, -1.74, 0.375),
    ("mlp", "random_labels", "n1"): EpochLaw(233.9658, 0.0, 0.176, 0.625),
    ("mlp", "random_labels", "n2"): EpochLaw(161.4365, 0.0, -1.119, 0.25),
    ("mlp", "true_data", "n1"): EpochLaw(204.0, 0.0, 0.097, 0.625),
    ("mlp", "true_data", "n2"): EpochLaw(147.0127, 0.0, 0.135, 0.25),
    ("shallow_cnn", "random_images", "n1"): EpochLaw(7.8032, 0.253, -0.466, 0.0),
    ("shallow_cnn", "random_images", "n2"): EpochLaw(67.2056, 0.062, -0.264, 0.0),
    ("shallow_cnn", "random_labels", "n1"): EpochLaw(112.6837, 0.064, -0.208, 0.0),
    ("shallow_cnn", "random_labels", "n2"): EpochLaw(51.6317, 0.101, -0.259, 0.0),
    ("shallow_cnn", "true_data", "n1"): EpochLaw(117.4275, 0.029, -0.297, 0.0),
    ("shallow_cnn", "true_data", "n2"): EpochLaw(64.3843, 0.047, -0.314, 0.0),
}


def model_family(model: str) -> tuple[str, float]:
    """Return the family of a model name and its scale in the family.

    The scale is width / 16 for the shallow CNN, the depth for the MLP, and 1 for
    the CIFAR zoo, whose models share the shallow CNN's laws until runs of their own
    refine them (see :func:`refinement_ratio`).
    """
    shallow = re.fullmatch(r"shallow_cnn_w(\d+)", model)
    if shallow:
        return "shallow_cnn", int(shallow.group(1)) / 16
    mlp = re.fullmatch(r"mlp_d(\d+)_h(\d+)", model)
    if mlp:
        return "mlp", float(mlp.group(1))
    return "zoo", 1.0


@dataclass(frozen=True)
class FinishedRun:
    """One finished training of the store, as the epoch estimate uses it."""

    model: str
    regime: str
    role: str
    n_images: int
    epochs: int
    max_epochs: int

    @classmethod
    def from_record(cls, record: Mapping[str, Any], full_split_size: int) -> "FinishedRun | None":
        """Read a store record, or return None for a failed training, whose epochs mean nothing here."""
        if record.get("status") != "ok":
            return None
        config = record["config"]
        subset = config.get("subset")
        return cls(
            model=config["model"],
            regime=config["regime"],
            role=config["role"],
            n_images=full_split_size if subset is None else subset,
            epochs=int(record["epochs"]),
            max_epochs=int(config["train"]["max_epochs"]),
        )


def law_epochs(model: str, regime: str, role: str, n_images: int, max_epochs: int = 500) -> float:
    """Return the fitted law's expected epochs under the cap, before refinement by finished runs."""
    family, scale = model_family(model)
    law = EPOCH_LAWS.get((family, regime, role)) or EPOCH_LAWS["shallow_cnn", regime, role]
    if (family, regime, role) not in EPOCH_LAWS:
        scale = 1.0
    return law.epochs(n_images, scale, max_epochs)


def refinement_ratio(model: str, regime: str, role: str, finished_records: Iterable[FinishedRun]) -> float:
    """Return observed / predicted epochs over the finished runs like this one (1.0 when there are none).

    Runs of the same model, regime and role are used when there are any, else those
    of the same family, regime and role. The ratio is clamped to [0.2, 5].
    """
    family = model_family(model)[0]
    similar = [
        run for run in finished_records
        if run.regime == regime and run.role == role and model_family(run.model)[0] == family
    ]
    runs = [run for run in similar if run.model == model] or similar
    if not runs:
        return 1.0
    observed = sum(run.epochs for run in runs)
    predicted = sum(law_epochs(run.model, run.regime, run.role, run.n_images, run.max_epochs) for run in runs)
    return min(5.0, max(0.2, observed / predicted))


def estimate_epochs(
    model: str,
    regime: str,
    role: str,
    n_images: int,
    num_classes: int,
    max_epochs: int = 500,
    finished_records: Iterable[FinishedRun] = (),
) -> float:
    """Estimate the epochs of one training under the stop rule, at most ``max_epochs``.

    The fitted :data:`EPOCH_LAWS` give the expected epochs from the family, the
    regime, the role and the number of training images. Finished runs of the store
    scale them by :func:`refinement_ratio`.

    NOTE: the laws were fitted on CIFAR-10 (10 classes). Other datasets and class
    counts use them unchanged, so there the first finished runs are what corrects the
    estimate; ``num_classes`` is only checked.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} must be at least 2")
    epochs = law_epochs(model, regime, role, n_images, max_epochs)
    return min(float(max_epochs), epochs * refinement_ratio(model, regime, role, finished_records))


# -- the survey that fits the laws ---------------------------------------------------


def survey_epochs(
    models: Sequence[str],
    subsets: Sequence[int],
    seeds: int,
    data_dir: str | None,
    device: torch.device | str = "cpu",
    regimes: Sequence[str] = ("true_data", "random_labels", "random_images"),
    dataset: str = "cifar10",
) -> Iterator[dict[str, Any]]:
    """Train real N1 and N2 networks on subsets of ``dataset`` and yield one row per training.

    For each subset size and model, the N1 of every seed and regime train as one
    fused group. Its members are independent runs, so their epochs are those of the
    one-network trainer. Then the N2 of the same architecture learn their labels.
    A row contains the dataset, n, model, seed, regime, role, epochs, stop reason and wall time.
    """
    from engine.experiments.dispatch import run_jobs
    from engine.experiments.jobs import DataContext
    from engine.experiments.plan import NetworkJob
    from engine.fused.trainer import FusedOptions
    from engine.training.config import TrainConfig

    data = DataContext(dataset, data_dir)
    train = TrainConfig()
    for n in subsets:
        for model in models:
            n1 = [NetworkJob("n1", model, dataset, s, n, r, train) for s in range(seeds) for r in regimes]
            options = FusedOptions(group_size=len(n1))
            parent_d2 = {}
            for job, record, predictions in run_jobs(n1, data, device, options=options):
                parent_d2[job.key] = predictions.get("d2")
                yield _survey_row(n, job, record)
            n2 = [
                NetworkJob("n2", model, dataset, job.seed, n, job.regime, train, parent=job.key)
                for job in n1 if parent_d2[job.key] is not None
            ]
            labels = {job.key: parent_d2[job.parent] for job in n2}
            for job, record, _ in run_jobs(n2, data, device, labels, options=options):
                yield _survey_row(n, job, record)


def _survey_row(n: int, job: Any, record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "dataset": job.dataset, "n": n, "model": job.model, "seed": job.seed, "regime": job.regime, "role": job.role,
        "epochs": record["epochs"], "stop": record["stop_reason"], "wall_s": record["wall_time_s"],
    }


def fit_laws(rows: Iterable[Mapping[str, Any]], min_images: int = 500) -> dict[tuple[str, str, str], EpochLaw]:
    """Fit an :class:`EpochLaw` per (family, regime, role) to survey rows of at least ``min_images``.

    ``stalled`` is the share of runs stopped at the cap. The others give ``a``, ``b``
    and ``c`` by least squares on ``log epochs = log a + b log n + c log scale``.
    ``b`` is fitted only from three subset sizes on, because two noisy sizes gave
    the MLP exponents above 2. ``c`` is fitted from two scales on. Otherwise they are 0.
    A group whose runs all stalled gets ``a = 1, b = c = 0, stalled = 1``.
    """
    import numpy as np

    groups: dict[tuple[str, str, str], list[tuple[float, float, float, bool]]] = {}
    for row in rows:
        if row["n"] < min_images:
            continue
        family, scale = model_family(row["model"])
        point = (row["n"], scale, row["epochs"], row["stop"] == "target_error")
        groups.setdefault((family, row["regime"], row["role"]), []).append(point)
    laws = {}
    for key, points in sorted(groups.items()):
        stalled = round(sum(not reached for *_, reached in points) / len(points), 3)
        reaching = [point[:3] for point in points if point[3]]
        if not reaching:
            laws[key] = EpochLaw(1.0, 0.0, 0.0, 1.0)
            continue
        n, scale, epochs = (np.log(np.array(column, dtype=float)) for column in zip(*reaching))
        fit_b, fit_c = len(set(n)) >= 3, len(set(scale)) >= 2
        columns = [np.ones_like(n)]
        if fit_b:
            columns.append(n)
        if fit_c:
            columns.append(scale)
        coefficients = list(np.linalg.lstsq(np.stack(columns, axis=1), epochs, rcond=None)[0])
        a = float(np.exp(coefficients.pop(0)))
        b = float(coefficients.pop(0)) if fit_b else 0.0
        c = float(coefficients.pop(0)) if fit_c else 0.0
        laws[key] = EpochLaw(round(a, 4), round(b, 3), round(c, 3), stalled)
    return laws


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the epoch survey and print its rows (JSON lines) and the fitted laws."""
    import json

    parser = argparse.ArgumentParser(
        prog="python -m engine.scheduling.calibration",
        description="Train real networks on dataset subsets and fit the epochs-to-stop laws of the budget planner.",
    )
    parser.add_argument("--models", default="shallow_cnn_w16,shallow_cnn_w32", help="comma-separated model names")
    parser.add_argument("--subsets", type=_int_list, default=[500, 1000], help="comma-separated subset sizes (images per split)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per (model, subset, regime)")
    parser.add_argument(
        "--regimes", default="true_data,random_labels,random_images", help="comma-separated data regimes of N1"
    )
    parser.add_argument("--dataset", default="cifar10", help="cifar10, cifar100 or mnist (default: cifar10)")
    parser.add_argument("--data-dir", help="dataset folder (default: $ENGINE_DATA_DIR, else the per-user cache)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--out", help="append the rows to this JSON-lines file too")
    parser.add_argument("--fit", metavar="FILE", help="train nothing: fit the laws to the rows of this JSON-lines file")
    args = parser.parse_args(argv)
    if args.fit:
        with open(args.fit) as lines:
            _print_laws(fit_laws(json.loads(line) for line in lines if line.strip()))
        return 0
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    rows = []
    sink = open(args.out, "a") if args.out else None
    try:
        rows_of_survey = survey_epochs(
            args.models.split(","), args.subsets, args.seeds, args.data_dir,
            regimes=args.regimes.split(","), dataset=args.dataset,
        )
        for row in rows_of_survey:
            rows.append(row)
            print(json.dumps(row), flush=True)
            if sink is not None:
                sink.write(json.dumps(row) + "\n")
                sink.flush()
    finally:
        if sink is not None:
            sink.close()
    _print_laws(fit_laws(rows))
    return 0


def _print_laws(laws: Mapping[tuple[str, str, str], EpochLaw]) -> None:
    """Print the laws as the entries of :data:`EPOCH_LAWS`."""
    for (family, regime, role), law in laws.items():
        print(f'    ("{family}", "{regime}", "{role}"): EpochLaw({law.a}, {law.b}, {law.c}, {law.stalled}),')


if __name__ == "__main__":
    sys.exit(main())
