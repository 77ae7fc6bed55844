"""Choose the fused group size by measuring training throughput on the device.

Whether fusion pays depends on the device and the architecture. On a GPU a step at
batch 64 is bound by kernel launches, so G members in one step can run nearly G times
faster. On a small CPU the fused activations of many members spill the caches, and
one-by-one training can win. So the group size is measured, never assumed: each
candidate G trains a few synthetic steps, and the one with the most images/s summed
over members wins. G=1 is the plain one-network trainer step and is always a
candidate.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.data.splits import to_float
from engine.fused.modules import empty_fused_like, is_fusable, prefers_channels_last
from engine.fused.sgd import FusedSGD, fused_train_step
from engine.models import create_model
from engine.models.registry import InputSpec
from engine.training.trainer import autocast_context
from engine.training.tune_cache import architecture_name, cache_file, cache_key, read_entry, save_entry

log = logging.getLogger(__name__)

# Group sizes tried by default, capped by the number of jobs and by memory.
DEFAULT_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128)
# A fused size must beat one-by-one training by this factor to be chosen: members
# that stop early leave idle slots until the group repacks, so a tie goes to G=1.
FUSED_MARGIN = 1.05
# Stop trying larger groups once one reaches less than this share of the best so far.
GIVE_UP_SHARE = 0.7
# Share of the free device memory that a group's training step may take.
MEMORY_SHARE = 0.5

# Measured images/s per group size, per (device, model, input, batch size, shared, precision).
_THROUGHPUT_CACHE: dict[tuple, dict[int, float]] = {}


@dataclass(frozen=True)
class GroupChoice:
    """The group size chosen for one kind of job, and the throughputs behind it.

    Attributes:
        model: model name.
        device: device the choice was made for.
        batch_size: minibatch size of the jobs.
        group_size: networks per fused group; 1 trains them one by one.
        reason: ``measured``, ``fixed`` (requested), ``single job`` or ``not fusable``.
        images_per_s: measured training throughput per candidate group size, in
            images per second summed over members (empty unless measured).
        precision: arithmetic of the measured steps.
        shared_batches: whether members of a group see the same batches.
        measure_time_s: wall time this choice spent measuring (0 when cached).
    """

    model: str
    device: str
    batch_size: int
    group_size: int
    reason: str
    images_per_s: dict[int, float] = field(default_factory=dict)
    precision: str = "fp32"
    shared_batches: bool = False
    measure_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (group sizes as string keys)."""
        return {
            "model": self.model,
            "device": self.device,
            "batch_size": self.batch_size,
            "group_size": self.group_size,
            "reason": self.reason,
            "images_per_s": {str(g): round(v, 1) for g, v in sorted(self.images_per_s.items())},
            "precision": self.precision,
            "shared_batches": self.shared_batches,
            "measure_time_s": round(self.measure_time_s, 3),
        }


def fixed_choice(
    model: str,
    device: torch.device | str,
    batch_size: int,
    group_size: int,
    precision: str = "fp32",
    shared_batches: bool = False,
    reason: str = "fixed",
) -> GroupChoice:
    """Return a choice that was not measured (requested size, single job, or no fused version)."""
    return GroupChoice(model, str(device), batch_size, group_size, reason, {}, precision, shared_batches)


@functools.lru_cache(maxsize=None)
def template_model(model_name: str, spec: InputSpec) -> nn.Module:
    """Build the named model on the meta device: its structure, without memory or RNG draws."""
    with torch.device("meta"):
        return create_model(model_name, spec)


def clear_cache() -> None:
    """Forget every measured throughput, so the next choice measures again."""
    _THROUGHPUT_CACHE.clear()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free_memory_bytes(device: torch.device) -> int | None:
    """Return the memory free for training on ``device``, or None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def step_bytes_per_member(model_name: str, spec: InputSpec, batch_size: int) -> int:
    """Estimate the memory one member's training step takes, in bytes (fp32).

    Counts the weights three times (weights, gradients, a momentum buffer) and every
    layer's output three times (output, its gradient, one temporary such as the
    ReLU output or a layout copy), found by a forward pass on the meta device.
    """
    template = template_model(model_name, spec)
    outputs = 0

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal outputs
        if isinstance(output, torch.Tensor):
            outputs += output.numel()

    leaves = [m for m in template.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        template(torch.empty(batch_size, spec.channels, spec.height, spec.width, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    weights = sum(p.numel() for p in template.parameters())
    images = batch_size * spec.channels * spec.height * spec.width
    return 4 * (3 * weights + 3 * outputs + 2 * images)


def max_group_size(model_name: str, spec: InputSpec, batch_size: int, device: torch.device) -> int | None:
    """Return the largest group whose step fits in a share of the free memory, or None if unknown."""
    free = _free_memory_bytes(device)
    if free is None:
        return None
    return max(1, int(MEMORY_SHARE * free // step_bytes_per_member(model_name, spec, batch_size)))


def _time_per_step(step: Callable[[int], None], device: torch.device, budget_s: float, windows: int = 3) -> float:
    """Return the seconds per step: the fastest of ``windows`` timed windows after a warm-up step.

    Each window runs at least one step and about ``budget_s / windows`` seconds. The
    fastest window is the one least disturbed by other processes on the machine. A
    step slower than the whole budget is timed once.
    """
    started = time.perf_counter()
    step(0)  # allocations and kernel selection (oneDNN, cuDNN) happen on the first call
    _synchronize(device)
    if time.perf_counter() - started > budget_s:
        windows = 1
    window_s = budget_s / windows
    count = 1
    fastest = float("inf")
    for _ in range(windows):
        steps = 0
        window_start = time.perf_counter()
        # Only host time is checked, so a GPU keeps its queue full; the synchronize
        # below makes the window include every queued step.
        while steps == 0 or (time.perf_counter() - window_start < window_s and steps < 100):
            step(count)
            count += 1
            steps += 1
        _synchronize(device)
        fastest = min(fastest, (time.perf_counter() - window_start) / steps)
    return fastest


def make_plain_step(
    model_name: str, spec: InputSpec, batch_size: int, device: torch.device, precision: str, pool: int
) -> Callable[[int], None]:
    """Return the one-network trainer's step (eager model and torch.optim.SGD) on synthetic data.

    The step takes the step number and trains one minibatch of ``batch_size`` from a
    pool of ``pool`` random uint8 images on ``device``, without a host sync.
    """
    model = create_model(model_name, spec).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    images = torch.randint(0, 256, (pool, spec.channels, spec.height, spec.width), dtype=torch.uint8, device=device)
    labels = torch.randint(spec.num_classes, (pool,), device=device)
    order = torch.randperm(pool, device=device)
    mistakes = torch.zeros((), dtype=torch.int64, device=device)
    context = autocast_context(precision, device)

    def step(i: int) -> None:
        index = order.roll(i * batch_size)[:batch_size]
        x, y = to_float(images[index]), labels[index]
        with context:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        mistakes.add_((logits.argmax(1) != y).sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def make_fused_step(
    model_name: str,
    spec: InputSpec,
    batch_size: int,
    group_size: int,
    device: torch.device,
    precision: str,
    shared: bool,
    pool: int,
) -> Callable[[int], None]:
    """Return the fused trainer's step for ``group_size`` members on synthetic data.

    The step takes the step number and trains one minibatch per member, without a
    host sync. Independent batches gather ``[G, B]`` indices from one image set.
    Shared batches feed one ``[B, C, H, W]`` batch to the dense first layer, which is
    the best case: members that share their images.
    """
    model = empty_fused_like(template_model(model_name, spec), group_size, spec).to(device).train()
    model.channels_last = prefers_channels_last(device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.01)
    optimizer = FusedSGD(list(model.parameters()), lr=[1e-3] * group_size)
    images = torch.randint(0, 256, (pool, spec.channels, spec.height, spec.width), dtype=torch.uint8, device=device)
    labels = torch.randint(spec.num_classes, (group_size, pool), device=device)
    orders = torch.stack([torch.randperm(pool, device=device) for _ in range(group_size)])
    loss_sum = torch.zeros(group_size, device=device)
    mistakes = torch.zeros(group_size, dtype=torch.int64, device=device)
    context = autocast_context(precision, device)

    def step(i: int) -> None:
        index = orders.roll(i * batch_size, dims=1)[:, :batch_size]
        if shared:
            x, y = to_float(images[index[0]]), labels[:, index[0]]
        else:
            x, y = to_float(images[index]), labels.gather(1, index)
        loss, wrong = fused_train_step(model, optimizer, x, y, shared, context)
        loss_sum.add_(loss)
        mistakes.add_(wrong)

    return step


def measure_throughput(
    model_name: str,
    spec: InputSpec,
    batch_size: int,
    group_size: int,
    device: torch.device | str,
    *,
    shared: bool = False,
    precision: str = "fp32",
    budget_s: float = 0.06,
) -> float:
    """Measure training images/s summed over members for one group size (1: the plain trainer).

    Runs one warm-up step and then three timed windows of about ``budget_s / 3``
    seconds each (at least one step) on random uint8 images held on the device, and
    keeps the fastest window. The global RNG is left as it was.
    """
    device = torch.device(device)
    pool = 4 * batch_size
    with torch.random.fork_rng(devices=[]):
        if group_size == 1:
            step = make_plain_step(model_name, spec, batch_size, device, precision, pool)
        else:
            step = make_fused_step(model_name, spec, batch_size, group_size, device, precision, shared, pool)
        seconds = _time_per_step(step, device, budget_s)
    return group_size * batch_size / seconds


def _candidates_for(n_jobs: int, candidates: Sequence[int] | None, cap: int | None) -> list[int]:
    if candidates is None:
        chosen = {g for g in DEFAULT_CANDIDATES if g < n_jobs} | {1, min(n_jobs, DEFAULT_CANDIDATES[-1])}
    else:
        chosen = {g for g in candidates if 1 <= g <= n_jobs} | {1}
    if cap is not None:
        chosen = {g for g in chosen if g <= cap} | {1}
    return sorted(chosen)


def choose_group_size(
    model_name: str,
    spec: InputSpec,
    batch_size: int,
    n_jobs: int,
    device: torch.device | str,
    candidates: Sequence[int] | None = None,
    *,
    shared: bool = False,
    precision: str = "fp32",
    budget_s: float = 0.06,
    total_budget_s: float = 3.0,
    cache: Path | str | None | bool = False,
) -> GroupChoice:
    """Measure candidate group sizes for this model on ``device`` and return the fastest.

    Args:
        model_name: a registered model; one without a fused version gets G=1.
        spec: input shape and classes.
        batch_size: minibatch size of the jobs.
        n_jobs: how many such jobs there are; no candidate exceeds it.
        device: where the jobs will train.
        candidates: group sizes to try (1 is always added); default 1, 2, 4, ..., 128
            below ``n_jobs``, and ``n_jobs`` itself up to 128.
        shared: measure shared batches (the dense first layer) instead of independent ones.
        precision: arithmetic of the measured steps (fp32, bf16, fp16).
        budget_s: time spent timing each candidate, after a warm-up step.
        total_budget_s: no further candidate is measured once measuring it would
            likely end past this many seconds; G=1 and the smallest fused
            candidate are always measured.
        cache: the autotune cache file that keeps throughputs across runs (``groups``
            in its entry for this architecture), None for ``tune_cache.cache_path()``,
            False for none.

    Candidates larger than half the free device memory allows are skipped, and so
    are larger ones once a candidate reaches less than 70% of the best throughput so
    far. A fused size is chosen only if it beats G=1 by 5%. A wide network on a CPU
    takes seconds per step, so there measuring alone can take several seconds. Throughputs are cached in
    this process per (device, model, input, batch size, shared, precision), so later
    calls measure only candidates not yet measured. With ``cache`` they are kept in
    the cache file too, for later runs. The choice and its throughputs are logged at INFO.
    """
    device = torch.device(device)
    if n_jobs < 1:
        raise ValueError(f"n_jobs={n_jobs} must be at least 1")
    if not is_fusable(template_model(model_name, spec)):
        return fixed_choice(model_name, device, batch_size, 1, precision, shared, "not fusable")
    if n_jobs == 1:
        return fixed_choice(model_name, device, batch_size, 1, precision, shared, "single job")

    started = time.perf_counter()
    cap = max_group_size(model_name, spec, batch_size, device)
    tried = _candidates_for(n_jobs, candidates, cap)
    # Images/s per group size: this process's timings, then the cache file's.
    throughputs = _THROUGHPUT_CACHE.setdefault((str(device), model_name, spec, batch_size, shared, precision), {})
    stored = _StoredThroughputs(cache, model_name, spec, batch_size, device, shared, precision)
    for g, speed in stored.read().items():
        throughputs.setdefault(g, speed)
    before = dict(throughputs)
    best = 0.0
    for rank, group_size in enumerate(tried):
        if group_size not in throughputs:
            if _gave_up(throughputs, group_size, best):
                break
            # A measurement costs about the budget plus a warm-up step. A step of G
            # members takes about G * batch / (best images/s so far) seconds.
            expected_s = budget_s + group_size * batch_size / best if best else budget_s
            if rank >= 2 and time.perf_counter() - started + expected_s > total_budget_s:
                break
            throughputs[group_size] = measure_throughput(
                model_name, spec, batch_size, group_size, device,
                shared=shared, precision=precision, budget_s=budget_s,
            )
        best = max(best, throughputs[group_size])
    measured = {g: throughputs[g] for g in tried if g in throughputs}
    if throughputs != before:
        stored.write(throughputs)

    fused = {g: v for g, v in measured.items() if g > 1}
    group_size = 1
    if fused:
        fastest = max(fused, key=fused.get)
        if fused[fastest] >= FUSED_MARGIN * measured[1]:
            group_size = fastest
    choice = GroupChoice(
        model_name, str(device), batch_size, group_size, "measured", measured, precision, shared,
        time.perf_counter() - started,
    )
    log.info(
        "group size for %s (batch %d, %s, %s batches) on %s: G=%d",
        model_name, batch_size, precision, "shared" if shared else "independent", device, group_size,
    )
    log.debug("group size for %s: images/s by G: %s", model_name,
              ", ".join(f"{g}: {v:.0f}" for g, v in sorted(measured.items())))
    return choice


class _StoredThroughputs:
    """Group-size throughputs of one architecture in the autotune cache file."""

    def __init__(
        self, cache: Path | str | None | bool, model_name: str, spec: InputSpec, batch_size: int,
        device: torch.device, shared: bool, precision: str,
    ) -> None:
        self.path = cache_file(cache)
        self.mode = "shared" if shared else "independent"
        self.key = ""
        if self.path is not None:
            architecture = architecture_name(template_model(model_name, spec))
            shape = (spec.channels, spec.height, spec.width)
            self.key = cache_key(architecture, shape, batch_size, precision, device)

    def read(self) -> dict[int, float]:
        """Return the stored images/s per group size (none without a file)."""
        groups = read_entry(self.path, self.key).get("groups", {})
        return {int(g): v for g, v in groups.get(self.mode, {}).items()}

    def write(self, throughputs: dict[int, float]) -> None:
        """Add ``throughputs`` to the stored ones, keeping the rest of the entry."""
        if self.path is None:
            return
        entry = read_entry(self.path, self.key)
        groups = entry.get("groups", {})
        merged = {**groups.get(self.mode, {}), **{str(g): v for g, v in throughputs.items()}}
        save_entry(self.path, self.key, {**entry, "groups": {**groups, self.mode: merged}})


def _gave_up(cache: dict[int, float], group_size: int, best: float) -> bool:
    """Return whether a smaller measured size already fell below ``GIVE_UP_SHARE`` of the best.

    NOTE: this assumes throughput falls monotonically once it starts falling with G,
    which holds for memory-bound CPU steps; it saves measuring huge groups there.
    """
    smaller = [g for g in cache if g < group_size]
    return bool(smaller) and cache[max(smaller)] < GIVE_UP_SHARE * best
