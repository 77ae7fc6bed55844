"""Train groups of networks of one architecture as fused modules, each member an independent run.

A member of a group gets what the one-network trainer would give it. It starts from
the initialization of its job (``build_model``) and draws its own minibatch order (a
CPU generator seeded with its order seed, one ``randperm`` per epoch). It trains on
its own images and labels, with its own learning rate, plateau schedule and stop. A
member that stops is frozen, and its record and predictions are produced and yielded
at once. Finished members leave the group (the stacked parameters are sliced to the
active ones) once they are a large share of it, so the step stops spending compute
on them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from engine.data.splits import to_float
from engine.experiments.deadline import TimeUp
from engine.experiments.jobs import (
    DataContext,
    build_model,
    make_record,
    predictions_of,
)
from engine.experiments.plan import NetworkJob
from engine.fused.modules import empty_fused_like, is_fusable, prefers_channels_last
from engine.fused.sgd import FusedSGD, fused_train_step
from engine.training.schedule import PlateauSchedule
from engine.training.trainer import TrainOutcome, autocast_context

log = logging.getLogger(__name__)

JobResult = tuple[NetworkJob, dict[str, Any], dict[str, np.ndarray]]

# Images per forward pass of the exact training-error evaluation, summed over members,
# as many as the one-network ``predict`` evaluates at a time on a GPU.
_EVAL_IMAGES = 1000


@dataclass(frozen=True)
class FusedOptions:
    """How to fuse the training of networks of one architecture.

    Attributes:
        group_size: members per fused group; None chooses it by measuring the
            device (see ``choose_group_size``), 1 trains one network at a time.
        share_batches: every member of a group gets the same minibatch order, that
            of the group's first job. Members that also share their images (N1 of
            one seed whose regime keeps the real D1 images, or N2 of one seed) then
            run the shallow CNN's first layer as one dense convolution. Members with
            different images still share the order, but keep the grouped
            convolution. A member's run then no longer equals its one-network run,
            except for the first member's.
        repack_fraction: finished members are dropped from a group (its stacked
            parameters sliced) once they are at least this share of it. Until then
            they stay in the step, frozen with learning rate 0. 1.0 repacks never.
        channels_last: the convolution layout of fused groups; None takes the
            device's usual one (``prefers_channels_last``).
    """

    group_size: int | None = None
    share_batches: bool = False
    repack_fraction: float = 0.25
    channels_last: bool | None = None

    def __post_init__(self) -> None:
        if self.group_size is not None and (isinstance(self.group_size, bool) or self.group_size < 1):
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer, or None to measure")
        if not 0.0 < self.repack_fraction <= 1.0:
            raise ValueError(f"repack_fraction={self.repack_fraction!r} must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Member:
    """One network of a group: its job, schedule, order stream and outcome so far."""

    job: NetworkJob
    schedule: PlateauSchedule
    generator: torch.Generator
    errors: list[float] = field(default_factory=list)
    failure: str | None = None

    @property
    def done(self) -> bool:
        return self.schedule.stopped


class _TrainingSets:
    """The group's training images, stored once per distinct set, and each member's labels.

    Layouts on the device: ``images`` uint8 ``[S*n, C, H, W]`` (S distinct sets of n
    images), ``offsets`` int64 ``[G]`` (first row of each member's set), ``labels``
    int64 ``[G, n]``. Members often share images (N1 of one seed under true_data and
    random_labels, N2 of one seed), so a group of 35 stores a few sets, not 35.
    """

    def __init__(self, images: list[torch.Tensor], labels: list[torch.Tensor], device: torch.device) -> None:
        distinct: list[torch.Tensor] = []
        self.set_index: list[int] = []
        for member_images in images:
            for s, known in enumerate(distinct):
                if known.shape == member_images.shape and torch.equal(known, member_images):
                    self.set_index.append(s)
                    break
            else:
                distinct.append(member_images)
                self.set_index.append(len(distinct) - 1)
        self.n = len(labels[0])
        self.images = torch.cat(distinct).to(device)
        self.labels = torch.stack(labels).to(device=device, dtype=torch.int64)
        self.offsets = torch.tensor(self.set_index, dtype=torch.int64, device=device) * self.n

    @property
    def single_set(self) -> bool:
        return len(set(self.set_index)) == 1

    def select(self, members: Sequence[int]) -> None:
        """Keep the listed members' labels and offsets (the images stay)."""
        index = torch.tensor(list(members), dtype=torch.long, device=self.labels.device)
        self.labels = self.labels.index_select(0, index)
        self.offsets = self.offsets.index_select(0, index)
        self.set_index = [self.set_index[m] for m in members]

    def batch(self, index: torch.Tensor, dense_shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather one minibatch: float images in [-1, 1] and labels ``[G, b]``.

        ``index`` is ``[G, b]`` (each member's own order) or ``[b]`` (a shared
        order). With ``dense_shared`` (shared order, one image set) the images are
        ``[b, C, H, W]``; otherwise ``[G, b, C, H, W]``.
        """
        if index.dim() == 1:
            labels = self.labels[:, index]
            if dense_shared:
                return self._gather(self.set_index[0] * self.n + index), labels
            return self._gather(self.offsets[:, None] + index[None, :]), labels
        return self._gather(self.offsets[:, None] + index), self.labels.gather(1, index)

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Return the images at ``rows`` (any shape) as floats in [-1, 1], shaped ``[*rows.shape, C, H, W]``."""
        # index_select of flat rows gathered 8x64 CIFAR images in 27 us against 457 us
        # for advanced indexing (min of 50, 2-core CPU, PyTorch 2.13). The scaling is
        # to_float's, so the pixels equal those of the one-network loader.
        images = self.images.index_select(0, rows.reshape(-1))
        return to_float(images.view(*rows.shape, *self.images.shape[1:]))


def _check_group(jobs: Sequence[NetworkJob], device: torch.device) -> None:
    if not jobs:
        raise ValueError("train_group needs at least one job")
    if len({job.key for job in jobs}) != len(jobs):
        raise ValueError("train_group got the same job twice; pass each job once")
    first = jobs[0]
    for job in jobs[1:]:
        for name, value, expected in (
            ("model", job.model, first.model),
            ("dataset", job.dataset, first.dataset),
            ("batch size", job.train.batch_size, first.train.batch_size),
            ("precision", job.train.precision, first.train.precision),
        ):
            if value != expected:
                raise ValueError(
                    f"a fused group needs one {name}: {job.describe()} has {value!r}, "
                    f"{first.describe()} has {expected!r}; group jobs with run_jobs"
                )
    if first.train.precision == "fp16" and device.type == "cuda":
        # One GradScaler over the summed loss would skip every member's step when one
        # member's gradients overflow, so the members would no longer be independent.
        raise ValueError("fused training does not support fp16 on CUDA; use bf16 or fp32, or train one by one")


class _FusedGroup:
    """The training state of one fused group; ``run`` trains it and yields finished members."""

    def __init__(
        self,
        jobs: Sequence[NetworkJob],
        data: DataContext,
        device: torch.device,
        parent_d2: Mapping[str, np.ndarray | None] | None,
        options: FusedOptions,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        self.data = data
        self.device = device
        self.stop = stop
        self.options = options
        self.started = time.perf_counter()
        self.precision = jobs[0].train.precision
        self.batch_size = jobs[0].train.batch_size
        self.trainer_name = f"fused G={len(jobs)}" + (" shared-batches" if options.share_batches else "")

        images, labels = [], []
        for job in jobs:
            job_images, job_labels = data.training_set(job, (parent_d2 or {}).get(job.key))
            images.append(job_images)
            labels.append(job_labels)
        sizes = {len(y) for y in labels}
        if len(sizes) != 1:
            raise ValueError(
                f"a fused group needs one training-set size, got {sorted(sizes)}; group jobs with run_jobs"
            )
        self.sets = _TrainingSets(images, labels, device)
        del images, labels

        # Members are built one at a time, each from its job's seed as run_job builds
        # it, and copied into the fused module, so only one extra model is in memory.
        first = build_model(jobs[0], data)
        if not is_fusable(first):
            raise TypeError(f"{jobs[0].model} has no fused version; train it with run_job")
        self.model = empty_fused_like(first, len(jobs), data.dataset.spec).to(device)
        layout = options.channels_last
        self.model.channels_last = prefers_channels_last(device) if layout is None else layout
        self.model.load_member(0, first)
        for g, job in enumerate(jobs[1:], start=1):
            self.model.load_member(g, build_model(job, data))
        self.optimizer = FusedSGD(
            list(self.model.parameters()),
            lr=[job.train.lr for job in jobs],
            momentum=[job.train.momentum for job in jobs],
            weight_decay=[job.train.weight_decay for job in jobs],
        )
        self.members = [
            _Member(job, PlateauSchedule(job.train), torch.Generator().manual_seed(job.order_seed)) for job in jobs
        ]
        # The shared order is the first job's own stream, so the first member's run
        # equals its one-network run even with shared batches.
        self.shared_generator = torch.Generator().manual_seed(jobs[0].order_seed) if options.share_batches else None

    def run(self) -> Iterator[JobResult]:
        log.info(
            "training %d %s networks as one fused group on %s (%d distinct training sets, %s batches)",
            len(self.members), self.members[0].job.model, self.device,
            len(set(self.sets.set_index)), "shared" if self.shared_generator is not None else "independent",
        )
        while not all(member.done for member in self.members):
            # Asked after the finished members were yielded and saved, so only the
            # members still training are lost.
            if self.stop is not None and self.stop():
                active = sum(not member.done for member in self.members)
                model = self.members[0].job.model
                raise TimeUp(f"time limit reached while {active} {model} members of a fused group trained")
            losses, mistakes = self._train_epoch()
            exact = self._exact_errors() if any(m.job.train.exact_train_error for m in self.members) else None
            finished = []
            for slot, member in enumerate(self.members):
                if member.done:
                    continue
                if not math.isfinite(losses[slot]):
                    self._diverge(member)
                else:
                    error = mistakes[slot] / self.sets.n
                    if exact is not None and member.job.train.exact_train_error:
                        error = exact[slot]
                    member.errors.append(error)
                    member.schedule.update(error)
                if member.done:
                    finished.append(slot)
            for slot in finished:
                yield self._finish(slot)
            self.optimizer.set_lr([0.0 if m.done else m.schedule.lr for m in self.members])
            self._repack_if_due()

    def _epoch_order(self) -> torch.Tensor:
        n = self.sets.n
        if self.shared_generator is not None:
            return torch.randperm(n, generator=self.shared_generator).to(self.device)
        # Finished members still in the group draw nothing, so the streams of the
        # others do not depend on when a repack happens.
        rows = [torch.arange(n) if m.done else torch.randperm(n, generator=m.generator) for m in self.members]
        return torch.stack(rows).to(self.device)

    def _train_epoch(self) -> tuple[list[float], list[int]]:
        """Run one epoch of every member; return their loss sums and mistakes (one host sync).

        NOTE: this loop has run on CPUs only. It is written for GPUs (indices, losses
        and mistakes stay on the device until the epoch ends), but its GPU speed is
        unmeasured.
        """
        order = self._epoch_order()
        groups = len(self.members)
        dense_shared = self.shared_generator is not None and self.sets.single_set
        precision_context = autocast_context(self.precision, self.device)
        self.model.train()
        loss_sum = torch.zeros(groups, dtype=torch.float32, device=self.device)
        mistakes = torch.zeros(groups, dtype=torch.int64, device=self.device)
        for start in range(0, self.sets.n, self.batch_size):
            index = order[..., start : start + self.batch_size]
            x, y = self.sets.batch(index, dense_shared)
            loss, wrong = fused_train_step(self.model, self.optimizer, x, y, dense_shared, precision_context)
            loss_sum += loss
            mistakes += wrong
        # NOTE: as in the one-network trainer, finiteness is checked once per epoch, so
        # a diverged member is stopped at the end of the epoch it diverged in.
        return loss_sum.tolist(), mistakes.tolist()

    @torch.no_grad()
    def _exact_errors(self) -> list[float]:
        """Return each member's 0-1 error on its whole training set, by an evaluation pass.

        The pass runs in fp32 whatever the training precision, as the one-network
        trainer's exact pass does.
        """
        groups, n = len(self.members), self.sets.n
        chunk = max(1, _EVAL_IMAGES // groups)
        mistakes = torch.zeros(groups, dtype=torch.int64, device=self.device)
        self.model.eval()
        for start in range(0, n, chunk):
            index = torch.arange(start, min(n, start + chunk), device=self.device)
            x, y = self.sets.batch(index, dense_shared=self.sets.single_set)
            logits = self.model.forward_shared(x) if self.sets.single_set else self.model(x)
            mistakes += (logits.argmax(2) != y).sum(1)
        self.model.train()
        return [count / n for count in mistakes.tolist()]

    def _diverge(self, member: _Member) -> None:
        member.failure = f"non-finite loss in epoch {member.schedule.epoch + 1} (lr {member.schedule.lr:g})"
        member.schedule.diverge()
        member.errors.append(float("nan"))
        log.warning("%s diverged in a fused group: %s", member.job.describe(), member.failure)

    def _finish(self, slot: int) -> JobResult:
        member = self.members[slot]
        schedule = member.schedule
        outcome = TrainOutcome(
            epochs=schedule.epoch,
            final_train_error=member.errors[-1],
            stop_reason=schedule.stop_reason,
            lr_drops=list(schedule.lr_drops),
            final_lr=schedule.lr,
            train_errors=list(member.errors),
            failure=member.failure,
            wall_time_s=time.perf_counter() - self.started,
            # A fused group gathers its batches from tensors on the device, runs eager,
            # and takes the convolution layout measured fastest for fused modules there.
            execution={
                "loader": "tensor", "channels_last": self.model.channels_last, "compile": "off",
                "threads": torch.get_num_threads(), "lanes": 1,
            },
        )
        predictions = {}
        if outcome.status == "ok":
            predictions = predictions_of(self.model.member(slot), member.job, self.data, self.device)
        return member.job, make_record(member.job, outcome, self.device, self.trainer_name), predictions

    def _repack_if_due(self) -> None:
        done = sum(member.done for member in self.members)
        if done == 0 or done == len(self.members) or done < self.options.repack_fraction * len(self.members):
            return
        keep = [slot for slot, member in enumerate(self.members) if not member.done]
        log.debug("repacking a fused group from %d to %d members", len(self.members), len(keep))
        self.model = self.model.select(keep)
        self.optimizer = self.optimizer.select(keep, list(self.model.parameters()))
        self.sets.select(keep)
        self.members = [self.members[slot] for slot in keep]


def train_group(
    jobs: Sequence[NetworkJob],
    data: DataContext,
    device: torch.device | str,
    parent_d2: Mapping[str, np.ndarray | None] | None = None,
    options: FusedOptions | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[JobResult]:
    """Train ``jobs`` as one fused group and yield ``(job, record, predictions)`` as each finishes.

    Args:
        jobs: jobs of one model, dataset, batch size, precision and training-set size.
            Learning rate, momentum, weight decay, schedule and stop rule may differ.
        data: the run's dataset and splits.
        device: where to train.
        parent_d2: for each N2 job's key, its parent N1's predictions on D2.
        options: ``share_batches``, ``repack_fraction`` and ``channels_last``; ``group_size`` is ignored
            (the group is ``jobs``).
        stop: called before every epoch. When it returns True, the members still
            training are abandoned with :class:`TimeUp`.

    Each member's record is built with ``make_record`` (trainer ``"fused G=<size>"``),
    with ``wall_time_s`` counted from the start of the group. A member that diverges
    is recorded as failed with the reason, like ``run_job`` does, and has no predictions.

    Raises:
        ValueError: the jobs differ in what a group must share, or fp16 on CUDA.
        TypeError: the model has no fused version.
    """
    device = torch.device(device)
    _check_group(jobs, device)
    group = _FusedGroup(jobs, data, device, parent_d2, options or FusedOptions(), stop)
    yield from group.run()
