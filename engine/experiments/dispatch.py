"""Dispatch a run's jobs: fused groups, one network at a time, or lanes, each where it pays.

``run_jobs`` buckets jobs by what a fused group must share, decides per bucket how
its networks train (autotuning the execution options, the group size and the
lanes), and yields each network's result as soon as it has finished. N2 jobs can
come with their N1 in one call: each N2 then starts once its parent has finished,
so lanes do not wait for the slowest N1 before the N2 start.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from engine.experiments.jobs import DataContext, run_job
from engine.experiments.plan import NetworkJob
from engine.fused.modules import is_fusable
from engine.fused.strategy import GroupChoice, choose_group_size, fixed_choice, template_model
from engine.fused.trainer import FusedOptions, JobResult, train_group
from engine.training.autotune import TuneResult, thread_count, tune
from engine.training.execution import ExecutionOptions
from engine.training.lanes import run_in_lanes

log = logging.getLogger(__name__)

Bucket = tuple[list[NetworkJob], GroupChoice, "TuneResult | None"]


def run_jobs(
    jobs: Iterable[NetworkJob],
    data: DataContext,
    device: torch.device | str,
    parent_d2: Mapping[str, np.ndarray | None] | None = None,
    options: FusedOptions | None = None,
    on_choice: Callable[[GroupChoice], None] | None = None,
    execution: ExecutionOptions | None = None,
    on_tune: Callable[[TuneResult], None] | None = None,
    stop: Callable[[], bool] | None = None,
    children: Sequence[NetworkJob] = (),
) -> Iterator[JobResult]:
    """Train ``jobs``, fused where it pays, and yield ``(job, record, predictions)`` as each finishes.

    Jobs are bucketed by (model, dataset, batch size, precision, training-set size).
    Each bucket gets a group size: ``options.group_size`` if set, else the fastest
    measured by ``choose_group_size`` on this device. A bucket is split into groups
    of at most that size. Size 1, a group of one job, a model without a fused
    version (the CIFAR zoo) and fp16 on CUDA train one by one with ``run_job``.

    Args:
        jobs: the jobs to train; an N2 job needs its entry in ``parent_d2``.
        data: the run's dataset and splits.
        device: where to train.
        parent_d2: for each N2 job's key, its parent N1's predictions on D2.
        options: group size, shared batches and repacking.
        on_choice: called with each bucket's group-size choice, e.g. to save it
            with the results.
        execution: loader, layout, compilation and threads. None trains as a plain
            eager loop and chooses the group size as above. Otherwise
            ``autotune.tune`` decides per bucket the options left open and the group
            size together, and the lanes: buckets that train one network at a time
            in several lanes train together, in threads, after the other buckets.
            A loader other than ``tensor`` is never fused, because fused groups
            gather their batches from the tensors. Lanes may still train several
            such networks at once. A layout given in ``execution`` applies to fused
            groups too.
        on_tune: called with each bucket's autotune result.
        stop: called after every epoch of every training. When it returns True,
            the networks in training are abandoned with :class:`TimeUp`.
        children: N2 jobs whose parent N1 is among ``jobs`` (or in ``parent_d2``).
            Each trains after its parent finished, on the parent's predictions on
            D2: in lanes as soon as the parent is done, else after every job of
            ``jobs``. A child whose parent failed is not trained and yields nothing.
    """
    device = torch.device(device)
    options = options or FusedOptions()
    if execution is not None and execution.channels_last is not None:
        # A layout the user gave holds for fused groups too.
        options = dataclasses.replace(options, channels_last=execution.channels_last)
    labels = dict(parent_d2 or {})
    jobs = list(jobs)
    waiting: dict[str, list[NetworkJob]] = {}
    for child in children:
        if child.key in labels:
            jobs.append(child)
        else:
            waiting.setdefault(child.parent, []).append(child)
    buckets: dict[tuple, list[NetworkJob]] = {}
    for job in [*jobs, *(child for kids in waiting.values() for child in kids)]:
        buckets.setdefault(_bucket_key(job, data), []).append(job)

    # Jobs that can train at the same time: the first ones, or the N2 released later
    # (an N2 never trains beside its own N1).
    concurrent = max(len(jobs), sum(map(len, waiting.values())))
    # Every bucket is tuned before any trains, so no measurement runs beside a training.
    decided: dict[tuple, Bucket] = {}
    for key, bucket in buckets.items():
        tuned = None
        if execution is None:
            choice = _group_choice(bucket, data, device, options)
        else:
            n_train = key[-1]
            tuned = _tune_bucket(bucket, n_train, data, device, options, execution, concurrent_jobs=concurrent)
            choice = tuned.group
            if on_tune is not None:
                on_tune(tuned)
        if on_choice is not None:
            on_choice(choice)
        decided[key] = (bucket, choice, tuned)

    def released(result: JobResult) -> list[NetworkJob]:
        """Return the children that a finished job lets start, with their labels set."""
        job, record, predictions = result
        kids = waiting.pop(job.key, [])
        if record["status"] != "ok":
            return []
        for kid in kids:
            labels[kid.key] = predictions[kid.parent_d2_name]
        return kids

    ready: list[NetworkJob] = []
    first = set(job.key for job in jobs)
    for key, (bucket, choice, tuned) in decided.items():
        if _in_lanes(choice, tuned):
            continue
        now = [job for job in bucket if job.key in first]
        for result in _train_bucket(now, choice, data, device, labels, options, tuned, stop):
            ready.extend(released(result))
            yield result
    laned = {key: tuned for key, (_, choice, tuned) in decided.items() if _in_lanes(choice, tuned)}
    if laned:
        start = [(job, laned[_bucket_key(job, data)]) for job in [*jobs, *ready] if _bucket_key(job, data) in laned]
        ready = [job for job in ready if _bucket_key(job, data) not in laned]

        def follow(result: JobResult) -> list[tuple[NetworkJob, TuneResult]]:
            kids = released(result)
            ready.extend(kid for kid in kids if _bucket_key(kid, data) not in laned)
            return [(kid, laned[_bucket_key(kid, data)]) for kid in kids if _bucket_key(kid, data) in laned]

        kids_in_lanes = {
            parent: [(kid, laned[_bucket_key(kid, data)]) for kid in kids if _bucket_key(kid, data) in laned]
            for parent, kids in waiting.items()
        }
        yield from _train_in_lanes(start, data, device, labels, stop, follow, laned.values(), kids_in_lanes)
    # Children of a sequential bucket whose parents have finished, in their buckets' groups.
    for key, (bucket, choice, tuned) in decided.items():
        later = [job for job in ready if _bucket_key(job, data) == key]
        if later:
            yield from _train_bucket(later, choice, data, device, labels, options, tuned, stop)


def _in_lanes(choice: GroupChoice, tuned: TuneResult | None) -> bool:
    """Return whether a bucket's networks train one at a time in several lanes."""
    return tuned is not None and choice.group_size == 1 and (tuned.options.lanes or 1) > 1


def _train_in_lanes(
    start: list[tuple[NetworkJob, TuneResult]],
    data: DataContext,
    device: torch.device,
    labels: Mapping[str, np.ndarray | None],
    stop: Callable[[], bool] | None,
    follow: Callable[[JobResult], list[tuple[NetworkJob, TuneResult]]],
    tuned_buckets: Iterable[TuneResult],
    kids_in_lanes: Mapping[str, list[tuple[NetworkJob, TuneResult]]],
) -> Iterator[JobResult]:
    """Train jobs in lanes, and the ones ``follow`` releases, and yield each as it finishes.

    A free lane starts the ready job of highest priority: its length (training-set
    size over tuned images/s) plus, for an N1, the length of its longest N2 in
    ``kids_in_lanes``. So the lanes finish close together.
    """

    def length(job: NetworkJob, tuned: TuneResult) -> float:
        return _bucket_key(job, data)[-1] / (tuned.images_per_s.get(tuned.chosen.label) or 1.0)

    def priority(job: NetworkJob, tuned: TuneResult) -> float:
        # An N1 counts with its longest N2, so that the N2 it releases need not wait.
        kids = [length(kid, kid_tuned) for kid, kid_tuned in kids_in_lanes.get(job.key, ())]
        return length(job, tuned) + max(kids, default=0.0)

    def task(job: NetworkJob, tuned: TuneResult) -> Callable[[Callable[[], bool]], list[JobResult]]:
        def train(cancelled: Callable[[], bool]) -> list[JobResult]:
            def halt() -> bool:
                return cancelled() or (stop is not None and stop())

            record, predictions = run_job(job, data, device, labels.get(job.key), tuned.options, halt)
            record["autotune"] = tuned.to_dict()
            return [(job, record, predictions)]

        return train

    def tasks(items: list[tuple[NetworkJob, TuneResult]]) -> list[tuple[float, Callable]]:
        return [(priority(job, tuned), task(job, tuned)) for job, tuned in items]

    lanes = max(tuned.options.lanes or 1 for tuned in tuned_buckets)
    threads = max(tuned.options.threads or 1 for tuned in tuned_buckets)
    log.info("training in %d lanes of %d thread%s", lanes, threads, "s" * (threads > 1))
    yield from run_in_lanes(tasks(start), lanes, threads, follow=lambda result: tasks(follow(result)))


def _train_bucket(
    bucket: list[NetworkJob],
    choice: GroupChoice,
    data: DataContext,
    device: torch.device,
    parent_d2: Mapping[str, np.ndarray | None],
    options: FusedOptions,
    tuned: TuneResult | None,
    stop: Callable[[], bool] | None,
) -> Iterator[JobResult]:
    """Train a bucket in groups of the chosen size, with the tuned options where there are any.

    The autotune choice is saved with each network's record.
    """
    single = tuned.options if tuned is not None else None

    def trained() -> Iterator[JobResult]:
        if choice.group_size == 1:
            for job in bucket:
                record, predictions = run_job(job, data, device, parent_d2.get(job.key), single, stop)
                yield job, record, predictions
            return
        jobs = bucket
        if options.share_batches:
            # Put members that share their images next to each other, so more groups
            # get the dense first layer: N1 of one seed share D1 unless the regime
            # draws random images, and N2 of one seed share D2.
            jobs = sorted(bucket, key=lambda job: (job.seed, job.role, job.regime == "random_images"))
        for chunk in _balanced_chunks(jobs, choice.group_size):
            if len(chunk) == 1:
                record, predictions = run_job(chunk[0], data, device, parent_d2.get(chunk[0].key), single, stop)
                yield chunk[0], record, predictions
            else:
                with thread_count(single.threads if single is not None else torch.get_num_threads()):
                    yield from train_group(chunk, data, device, parent_d2, options, stop)

    for job, record, predictions in trained():
        if tuned is not None:
            record["autotune"] = tuned.to_dict()
        yield job, record, predictions


def _balanced_chunks(jobs: list[NetworkJob], group_size: int) -> list[list[NetworkJob]]:
    """Split into the fewest groups of at most ``group_size``, sizes differing by at most one."""
    count = -(-len(jobs) // group_size)
    base, extra = divmod(len(jobs), count)
    chunks, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        chunks.append(jobs[start : start + size])
        start += size
    return chunks


def _bucket_key(job: NetworkJob, data: DataContext) -> tuple:
    split = data.split(job.seed, job.subset)
    n = len(split.d1) if job.role == "n1" else len(split.d2)
    return (job.model, job.dataset, job.train.batch_size, job.train.precision, n)


def _fusable(job: NetworkJob, data: DataContext, device: torch.device) -> bool:
    """Return whether the job's model has a fused version that can train at its precision on ``device``."""
    template = template_model(job.model, data.dataset.spec)
    return is_fusable(template) and not (job.train.precision == "fp16" and device.type == "cuda")


def _group_choice(
    bucket: Sequence[NetworkJob], data: DataContext, device: torch.device, options: FusedOptions
) -> GroupChoice:
    """Return the group size of a bucket trained as a plain eager loop: fixed, or measured on the device."""
    first = bucket[0]
    fusable = _fusable(first, data, device)
    if not fusable or len(bucket) == 1:
        return fixed_choice(first.model, device, first.train.batch_size, 1, first.train.precision,
                            options.share_batches, "not fusable" if not fusable else "single job")
    if options.group_size is not None:
        return fixed_choice(first.model, device, first.train.batch_size, options.group_size,
                            first.train.precision, options.share_batches, "fixed")
    return choose_group_size(
        first.model, data.dataset.spec, first.train.batch_size, len(bucket), device,
        shared=options.share_batches, precision=first.train.precision,
    )


def _tune_bucket(
    bucket: Sequence[NetworkJob],
    n_train: int,
    data: DataContext,
    device: torch.device,
    options: FusedOptions,
    execution: ExecutionOptions,
    concurrent_jobs: int = 1,
) -> TuneResult:
    """Decide the execution options, group size and lanes of a bucket of ``n_train``-image trainings.

    ``concurrent_jobs`` counts the jobs of every bucket that could train at once in lanes.
    """
    first = bucket[0]
    group_size = options.group_size
    if execution.loader != "tensor" or len(bucket) == 1 or not _fusable(first, data, device):
        group_size = 1
    elif group_size is not None:
        group_size = min(group_size, len(bucket))
    return tune(
        first.model, data.dataset.spec, first.train, n_train, len(bucket), device, execution,
        group_size=group_size, shared_batches=options.share_batches, concurrent_jobs=concurrent_jobs,
    )
