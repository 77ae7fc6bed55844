"""Autotuning: time a few training steps of each execution option and keep the fastest.

Tuned per device, architecture, input shape, batch size and precision: the memory
layout (NCHW or channels_last), ``torch.compile`` (off or a mode) and, on a CPU,
the thread count (1 or the process's count). Each combination is timed with the
tensor loader. For the fused families the group size is chosen too, by
``engine.fused.strategy.choose_group_size``. On a CPU, lanes (one network per
thread, several trained at once, see ``engine.training.lanes``) are timed against
one network and kept where they are faster. These options change only the rounding
of a run, so results stay within seed noise. Threads matter on a shared machine: with
other processes busy on a 2-core CPU, one thread trained a shallow CNN 1.6 to 3 times
faster than two, whose every parallel operator waits for the descheduled thread.

Not tuned: the precision. bf16 or fp16 autocast changes the arithmetic of the
protocol, and the precision is part of every job key, so only the user's ``--amp``
sets it and autotuning measures at that precision. Nor the loader (the tensor
loader is the fastest for data that fits on the device, see the benchmarks), nor
anything of the protocol (batch size, learning rate, stop rule).

Compilation costs seconds to a minute per architecture and layout (3.5 to 44 s for
one shallow CNN on a busy 2-core CPU, PyTorch 2.13). A process pays it once, because
dynamo reuses its compiled code for later models of the same shapes. So compiled
candidates are timed only when the planned eager work would repay a compilation
even at a modest speedup, and one is chosen only when its compilation plus the
planned steps beats the best eager option.

Measurements are kept in a JSON file, ``$ENGINE_AUTOTUNE_CACHE`` or
``autotune.json`` in the per-user cache folder, so later runs on the same machine
skip them and only re-decide whether compilation pays for their planned work.

The timing is sized to the planned work: about a tenth of its estimated time, shared
among the candidates, within fixed bounds per candidate. A few epochs of a small
grid are timed briefly, a full study for the longest windows. A cached measurement
serves a later plan only if it was timed at least as long as that plan calls for.
Otherwise it is timed again.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from engine.data.loaders import TensorLoader
from engine.models import create_model
from engine.models.registry import InputSpec
from engine.training.config import TrainConfig
from engine.training.execution import ExecutionOptions
from engine.training.trainer import autocast_context, compile_model, train_step
from engine.training.tune_cache import (  # noqa: F401 - the key and the file are part of this module's API
    CACHE_ENV,
    architecture_name,
    cache_file,
    cache_key,
    cache_path,
    device_name,
    read_entry,
    save_entry,
    session_timed_s,
)

log = logging.getLogger(__name__)

# Seconds of timed steps per candidate, split into windows interleaved across
# candidates, so a burst of load on a shared machine slows all candidates alike.
BUDGET_S = 0.3
WINDOWS = 3
MAX_STEPS_PER_WINDOW = 50
# Timing is sized to the work it decides: all candidates together get about this
# share of the planned training time, each at least MIN_BUDGET_S and at most
# BUDGET_S (LANES_BUDGET_S for lanes). Cached timings shorter than a later, larger
# plan calls for are timed again.
TUNE_SHARE = 0.1
MIN_BUDGET_S = 0.06
MIN_LANES_BUDGET_S = 0.1
# Compiled candidates are timed only if compiling would be repaid by a step this
# much shorter than the best eager step. The best gain of torch.compile seen for
# the shallow CNN on a 2-core CPU was 1.8x, a 44% shorter step.
ASSUMED_COMPILE_SAVING = 0.4
# Group sizes are measured only if fusion could repay the measurement (about
# GROUP_MEASURE_S seconds, the total budget of ``choose_group_size``) by saving this
# share of the planned work. NOTE: an assumed bound; on a 2-core CPU no fused group
# size was seen to save that much over the tuned one-network step.
ASSUMED_FUSED_SAVING = 0.5
GROUP_MEASURE_S = 3.0
# Compilation seconds assumed before one was measured on this machine. A shallow
# CNN took 3.5 to 44 s on a busy 2-core CPU (PyTorch 2.13), and zoo models take longer.
COMPILE_COST_PRIOR_S = 30.0
# A compiled candidate must beat the best eager one by this factor, so timing
# noise alone does not choose a compiled step.
COMPILE_MARGIN = 1.03

# Lanes (networks trained at once, one thread each) are chosen only if they beat the
# tuned one-network throughput by this factor.
LANES_MARGIN = 1.05
# Seconds of timed steps of the lanes, and again of one network beside them.
LANES_BUDGET_S = 0.4

# (cache key, candidate label) compiled in this process: their compilation is paid.
_COMPILED_HERE: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Candidate:
    """One combination of layout, compilation and thread count that autotuning can time."""

    channels_last: bool
    compile: str
    threads: int

    @property
    def label(self) -> str:
        layout = "channels_last" if self.channels_last else "nchw"
        return f"{layout},compile={self.compile},threads={self.threads}"


@dataclass
class TuneResult:
    """The options autotuning chose and the measurements behind the choice.

    Attributes:
        key: the cache key (device, architecture, input, batch size, precision).
        options: the execution options to train with, every option decided.
        images_per_s: training throughput per candidate label.
        compile_s: compilation seconds per compiled candidate label.
        skipped: candidates not timed, with the reason.
        failed: candidates whose compilation or step raised, with the error.
        source: ``measured`` (some candidate timed now), ``cache`` (all from the
            cache file) or ``fixed`` (nothing to tune).
        measure_time_s: wall time spent timing in this call.
        planned_steps: training steps the choice was made for.
        group: the fused group size choice, where one was made (``tune`` only).
    """

    key: str
    options: ExecutionOptions
    images_per_s: dict[str, float] = field(default_factory=dict)
    compile_s: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    source: str = "fixed"
    measure_time_s: float = 0.0
    planned_steps: int = 0
    group: Any = None
    lanes_images_per_s: dict[int, float] = field(default_factory=dict)
    lanes_reason: str = ""

    @property
    def chosen(self) -> Candidate:
        options = self.options.with_defaults()
        return Candidate(bool(options.channels_last), options.compile, options.threads)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready record of the choice, for saving with the results."""
        return {
            "key": self.key,
            "chosen": self.chosen.label,
            "images_per_s": {k: round(v, 1) for k, v in self.images_per_s.items()},
            "compile_s": {k: round(v, 2) for k, v in self.compile_s.items()},
            "skipped": dict(self.skipped),
            "failed": dict(self.failed),
            "source": self.source,
            "measure_time_s": round(self.measure_time_s, 3),
            "planned_steps": self.planned_steps,
            "group": self.group.to_dict() if self.group is not None else None,
            "lanes": self.options.lanes,
            "lanes_images_per_s": {str(k): round(v, 1) for k, v in self.lanes_images_per_s.items()},
            "lanes_reason": self.lanes_reason,
        }


def compile_modes(device: torch.device) -> list[str]:
    """Return the compile modes autotuning tries: CUDA graphs only on CUDA; max-autotune only on request."""
    return ["default", "reduce-overhead"] if device.type == "cuda" else ["default"]


def has_convolutions(model: nn.Module) -> bool:
    """Return whether the layout can matter: the model has a 4-d weight."""
    return any(p.dim() == 4 for p in model.parameters())


def thread_counts(device: torch.device) -> list[int]:
    """Return the thread counts autotuning tries: 1 and the process's count on a CPU."""
    if device.type != "cpu":
        return [torch.get_num_threads()]
    return sorted({1, torch.get_num_threads()})


@contextlib.contextmanager
def thread_count(threads: int):
    """Run the block with ``torch.set_num_threads(threads)``, then restore the previous count."""
    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads != previous:
            torch.set_num_threads(previous)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(
    model: nn.Module,
    candidate: Candidate,
    input_shape: Sequence[int],
    batch_size: int,
    precision: str,
    device: torch.device,
) -> Callable[[int], None]:
    """Return the trainer's step for a copy of ``model`` under ``candidate``, on random uint8 images.

    The step takes the step number, gathers a batch from a pool of ``4 * batch_size``
    images as the tensor loader does, and trains one SGD step without a host sync.
    """
    clone = copy.deepcopy(model).to(device).train()
    if candidate.channels_last:
        clone.to(memory_format=torch.channels_last)
    forward = compile_model(clone, candidate.compile)
    optimizer = torch.optim.SGD(clone.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    context = autocast_context(precision, device)
    pool = 4 * batch_size
    images = torch.randint(0, 256, (pool, *input_shape), dtype=torch.uint8, device=device)
    labels = torch.randint(2, (pool,), device=device)
    loader = TensorLoader(images, labels, batch_size, device, channels_last=candidate.channels_last)
    order = torch.randperm(pool, device=device)
    mistakes = torch.zeros((), dtype=torch.int64, device=device)

    def step(i: int) -> None:
        index = order.roll(i * batch_size)[:batch_size]
        x, y = loader.batch(index), loader.labels[index]
        logits, _ = train_step(forward, optimizer, scaler, context, x, y)
        mistakes.add_((logits.argmax(1) != y).sum())

    return step


def timing_budget(planned_s: float | None, candidates: int, floor: float, ceiling: float) -> float:
    """Return the timing seconds per candidate for ``planned_s`` seconds of planned training.

    ``TUNE_SHARE`` of the planned time shared among the candidates, within
    ``[floor, ceiling]``. Unknown planned work (None or 0) gets ``ceiling``.
    """
    if not planned_s or planned_s <= 0:
        return ceiling
    return min(ceiling, max(floor, TUNE_SHARE * planned_s / max(1, candidates)))


def time_candidates(
    steps: dict[str, Callable[[int], None]],
    device: torch.device,
    budget_s: float = BUDGET_S,
    slow: Sequence[str] = (),
    threads: dict[str, int] | None = None,
    budget_for: Callable[[float], float] | None = None,
) -> dict[str, float]:
    """Return the seconds per step of each warmed-up step function: its fastest window.

    ``WINDOWS`` rounds run a window of each candidate in turn, each about
    ``budget_s / WINDOWS`` seconds and at least one step. Candidates listed in
    ``slow`` (a step longer than ``budget_s``) get only the first round's window.
    ``threads`` gives a candidate's thread count (default: the current one).
    ``budget_for``, when given, maps the fastest step's seconds after the first
    round to the per-candidate budget of the remaining rounds (see ``timing_budget``).
    """
    return _time_rounds(steps, device, budget_s, slow, threads, budget_for)[0]


def _time_rounds(
    steps: dict[str, Callable[[int], None]],
    device: torch.device,
    budget_s: float,
    slow: Sequence[str],
    threads: dict[str, int] | None,
    budget_for: Callable[[float], float] | None,
) -> tuple[dict[str, float], float]:
    """Time as ``time_candidates`` does, and also return the per-candidate budget used."""
    fastest = {label: float("inf") for label in steps}
    counts = {label: 1 for label in steps}
    window_s = budget_s / WINDOWS
    for round_index in range(WINDOWS):
        if round_index == 1 and budget_for is not None:
            budget_s = budget_for(min(fastest.values()))
            window_s = budget_s / WINDOWS
        for label, step in steps.items():
            if round_index > 0 and label in slow:
                continue
            with thread_count((threads or {}).get(label, torch.get_num_threads())):
                done = 0
                started = time.perf_counter()
                while done == 0 or (time.perf_counter() - started < window_s and done < MAX_STEPS_PER_WINDOW):
                    step(counts[label])
                    counts[label] += 1
                    done += 1
                _synchronize(device)
                fastest[label] = min(fastest[label], (time.perf_counter() - started) / done)
    return fastest, budget_s


def _measure(
    model: nn.Module,
    candidates: Sequence[Candidate],
    input_shape: Sequence[int],
    batch_size: int,
    precision: str,
    device: torch.device,
    budget_s: float,
    planned_steps: int = 0,
) -> tuple[dict[str, float], dict[str, float], dict[str, str], float]:
    """Time candidates and return images/s and compile seconds per label, the failures and the budget used.

    Each candidate's first step is its warm-up, where compilation and kernel
    selection happen; its compile seconds are that step's time less a timed step.
    With ``planned_steps``, the first round of windows is ``MIN_BUDGET_S`` long and
    the budget per candidate (at most ``budget_s``) follows from the fastest step
    times the planned steps (``timing_budget``).
    """
    working, first, failed = {}, {}, {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for candidate in candidates:
            label = candidate.label
            started = time.perf_counter()
            # A missing C++ compiler or an operator the compiler cannot handle
            # raises in the first call, where compilation happens.
            try:
                step = make_step(model, candidate, input_shape, batch_size, precision, device)
                with thread_count(candidate.threads):
                    step(0)
                    _synchronize(device)
            except Exception as exc:  # noqa: BLE001 - any failure rules the candidate out
                message = str(exc).splitlines()[0] if str(exc) else ""
                failed[label] = f"{type(exc).__name__}: {message}"
                log.warning("autotune: %s failed and is skipped: %s", label, failed[label])
                continue
            first[label] = time.perf_counter() - started
            working[label] = step
        slow = [label for label, seconds in first.items() if seconds > budget_s]
        threads = {c.label: c.threads for c in candidates}
        first_budget_s, budget_for = budget_s, None
        if planned_steps > 0 and budget_s > MIN_BUDGET_S:
            first_budget_s = MIN_BUDGET_S

            def budget_for(step_s: float) -> float:
                return timing_budget(planned_steps * step_s, len(working), MIN_BUDGET_S, budget_s)

        seconds, used_s = (
            _time_rounds(working, device, first_budget_s, slow, threads, budget_for) if working else ({}, budget_s)
        )
    speeds = {label: batch_size / s for label, s in seconds.items()}
    compiled = {c.label for c in candidates if c.compile != "off"}
    compile_s = {label: max(0.0, first[label] - seconds[label]) for label in seconds if label in compiled}
    return speeds, compile_s, failed, used_s


def _planned_cost(
    candidate: Candidate, speed: float, compile_s: float | None, batch_size: int, planned_steps: int, key: str
) -> float:
    """Return the planned training seconds under ``candidate``, its compilation included unless already paid."""
    cost = planned_steps * batch_size / speed
    if candidate.compile != "off" and (key, candidate.label) not in _COMPILED_HERE:
        cost += compile_s if compile_s is not None else COMPILE_COST_PRIOR_S
    return cost


def tune_module(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    precision: str,
    device: torch.device | str,
    options: ExecutionOptions,
    planned_steps: int,
    *,
    full_batches: bool = True,
    name: str | None = None,
    cache: Path | str | None | bool = None,
    budget_s: float = BUDGET_S,
    label: str | None = None,
) -> TuneResult:
    """Choose the layout and compilation of ``model``'s training on ``device`` by timing copies of it.

    Args:
        model: the network (not changed: copies are timed).
        input_shape: one image's shape ``(C, H, W)``.
        batch_size: minibatch size of the training.
        precision: the protocol's precision (fp32, bf16, fp16), timed as it is.
        device: where the training runs.
        options: the user's options; a layout, compile mode or thread count given
            there is kept, the ones left at None are tuned.
        planned_steps: training steps the choice is for (all jobs together).
        full_batches: whether there is a full batch at all; without one nothing
            would run compiled (the smaller last batch runs eager).
        name: architecture name for the cache key (default: class and parameter
            shapes, so equal architectures share their measurements).
        cache: cache file path, None for ``cache_path()``, False for no cache file.
        budget_s: timing seconds per candidate after its warm-up step.
        label: the model's name in the log (default: ``name``, else the cache key's name).
    """
    device = torch.device(device)
    started = time.perf_counter()
    key = cache_key(name or architecture_name(model), input_shape, batch_size, precision, device)
    path = cache_file(cache)
    entry = read_entry(path, key)
    speeds: dict[str, float] = dict(entry.get("images_per_s", {}))
    compile_s: dict[str, float] = dict(entry.get("compile_s", {}))
    failed: dict[str, str] = dict(entry.get("failed", {}))
    timed_s: dict[str, float] = dict(entry.get("timed_s", {}))
    skipped: dict[str, str] = {}

    layouts = [options.channels_last] if options.channels_last is not None else (
        [False, True] if has_convolutions(model) else [False]
    )
    if options.compile is not None:
        modes = [options.compile]
    else:
        modes = ["off"] + (compile_modes(device) if full_batches else [])
    counts = [options.threads] if options.threads is not None else thread_counts(device)
    eager = [Candidate(cl, "off", n) for cl in layouts for n in counts if "off" in modes]
    compiled = [Candidate(cl, mode, n) for cl in layouts for mode in modes for n in counts if mode != "off"]
    if len(eager) + len(compiled) == 1:
        only = (eager + compiled)[0]
        chosen = dataclasses.replace(
            options, channels_last=only.channels_last, compile=only.compile, threads=only.threads
        )
        return TuneResult(key, chosen, source="fixed", planned_steps=planned_steps)

    def precise_enough(labels: Sequence[str], candidates: int) -> bool:
        """Return whether the cached speeds of ``labels`` were timed as long as this plan calls for."""
        if not labels:
            return True
        known = [speeds[label] for label in labels if label in speeds]
        if len(known) < len(labels):
            return False
        planned_s = planned_steps * batch_size / max(known)
        needed_s = timing_budget(planned_s, candidates, MIN_BUDGET_S, budget_s)
        return all(timed_s.get(label, 0.0) >= 0.999 * needed_s for label in labels)

    measured = False
    todo = [c for c in eager if c.label not in failed]
    if not precise_enough([c.label for c in todo], len(todo)):
        new_speeds, _, new_failed, used_s = _measure(
            model, todo, input_shape, batch_size, precision, device, budget_s, planned_steps
        )
        speeds.update(new_speeds)
        failed.update(new_failed)
        timed_s.update(dict.fromkeys(new_speeds, round(used_s, 4)))
        measured = True
        _warn_if_timed_under_load(new_speeds, todo, label or name or architecture_name(model), path)

    best_eager = max((speeds[c.label] for c in eager if c.label in speeds), default=None)
    if compiled and options.compile is None and best_eager is not None:
        planned_eager_s = planned_steps * batch_size / best_eager
        known = sorted(compile_s.values())
        expected_compile_s = known[len(known) // 2] if known else COMPILE_COST_PRIOR_S
        if planned_eager_s * ASSUMED_COMPILE_SAVING < expected_compile_s:
            reason = (
                f"planned work of about {planned_eager_s:.0f} s eager is too small to repay "
                f"about {expected_compile_s:.0f} s of compilation"
            )
            skipped["compile"] = reason
            compiled = []
    todo = [c for c in compiled if c.label not in speeds and c.label not in failed]
    if todo:
        # Compiled candidates are timed only for planned work large enough to repay a
        # compilation, so they get the full budget.
        new_speeds, new_compile_s, new_failed, used_s = _measure(
            model, todo, input_shape, batch_size, precision, device, budget_s
        )
        speeds.update(new_speeds)
        compile_s.update(new_compile_s)
        failed.update(new_failed)
        timed_s.update(dict.fromkeys(new_speeds, round(used_s, 4)))
        _COMPILED_HERE.update((key, label) for label in new_speeds)
        measured = True

    timed = [c for c in eager + compiled if c.label in speeds]
    if not timed:
        raise RuntimeError(f"autotune: every candidate failed for {key}: {failed}")
    # Unknown planned work (0 steps) is weighed as one step, so the fastest eager step wins.
    costs = {
        c.label: _planned_cost(c, speeds[c.label], compile_s.get(c.label), batch_size, max(1, planned_steps), key)
        for c in timed
    }
    best = min(timed, key=lambda c: costs[c.label])
    if best.compile != "off" and best_eager is not None and speeds[best.label] < COMPILE_MARGIN * best_eager:
        best = max((c for c in timed if c.compile == "off"), key=lambda c: speeds[c.label])
    chosen = dataclasses.replace(options, channels_last=best.channels_last, compile=best.compile, threads=best.threads)

    if measured and path is not None:
        save_entry(path, key, {
            **entry,
            "images_per_s": speeds,
            "compile_s": compile_s,
            "failed": failed,
            "timed_s": timed_s,
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
    result = TuneResult(
        key, chosen, {c.label: speeds[c.label] for c in timed},
        {c.label: compile_s[c.label] for c in timed if c.label in compile_s},
        skipped, {label: failed[label] for label in failed if label in {c.label for c in eager + compiled}},
        "measured" if measured else "cache", time.perf_counter() - started, planned_steps,
    )
    display_name = label or name or architecture_name(model)
    log.info(
        "autotune %s (%s): %s at %.0f images/s", display_name, "measured" if measured else "from cache", best.label,
        speeds[best.label],
    )
    log.debug(
        "autotune %s: images/s %s%s", display_name,
        ", ".join(f"{label} {value:.0f}" for label, value in result.images_per_s.items()),
        f"; compile s {', '.join(f'{k} {v:.1f}' for k, v in result.compile_s.items())}" if result.compile_s else "",
    )
    return result


# Several threads of one step slower than one thread by this factor suggest that
# another process held the CPUs while timing.
LOAD_SUSPECT_RATIO = 0.5


def _warn_if_timed_under_load(
    speeds: dict[str, float], candidates: Sequence[Candidate], name: str, path: Path | None
) -> None:
    """Warn when several threads timed far slower than one thread of the same layout.

    That is what a busy machine does to a multi-threaded step, and the timing stays in
    the cache after the load is gone.
    """
    for candidate in candidates:
        one_thread = dataclasses.replace(candidate, threads=1)
        if candidate.threads < 2 or candidate.label not in speeds or one_thread.label not in speeds:
            continue
        if speeds[candidate.label] < LOAD_SUSPECT_RATIO * speeds[one_thread.label]:
            where = f"delete {path} to time again" if path is not None else "time again on an idle machine"
            log.warning(
                "autotune %s: %d threads timed %.0f images/s against %.0f for 1 thread; another process was "
                "probably busy on the CPUs, and this timing is kept for later runs: %s",
                name, candidate.threads, speeds[candidate.label], speeds[one_thread.label], where,
            )


def too_small_to_measure_groups(result: TuneResult, batch_size: int) -> bool:
    """Return whether even a large fused speed-up could not repay measuring group sizes.

    Judged like compilation: the planned eager seconds at the tuned speed, times the
    saving fusion could bring, against the seconds the measurement takes. Without a
    measured speed (options fixed by the user) the group sizes are measured.
    """
    speed = result.images_per_s.get(result.chosen.label)
    if not speed:
        return False
    planned_s = result.planned_steps * batch_size / speed
    return planned_s * ASSUMED_FUSED_SAVING < GROUP_MEASURE_S


def tune(
    model_name: str,
    spec: InputSpec,
    config: TrainConfig,
    n_train: int,
    n_jobs: int,
    device: torch.device | str,
    options: ExecutionOptions,
    *,
    group_size: int | None = None,
    shared_batches: bool = False,
    cache: Path | str | None | bool = None,
    concurrent_jobs: int = 1,
) -> TuneResult:
    """Choose the execution options and the fused group size for ``n_jobs`` jobs of one kind.

    The layout and compilation come from ``tune_module`` on a fresh model (the
    global RNG is left as it was), planned for ``n_jobs`` trainings of
    ``config.max_epochs`` epochs (an upper bound: most runs stop earlier). The group
    size is ``group_size`` when given. Otherwise, for a fused family and more than
    one job, ``choose_group_size`` measures it. A fused size is kept only if it beats
    the tuned one-network throughput by the fused strategy's margin.

    The lanes (networks trained at once, see ``engine.training.lanes``) are
    ``options.lanes`` when given, with ``threads`` defaulting to the process's count
    shared among them. Otherwise, on a CPU with several threads, when networks train
    one at a time in eager mode and ``concurrent_jobs`` (the jobs of this run that
    could train together, of any kind) is at least 2, one lane per thread is timed
    against one network under the tuned options, and kept if it beats that by
    ``LANES_MARGIN``.
    """
    from engine.fused.modules import is_fusable
    from engine.fused.strategy import FUSED_MARGIN, choose_group_size, fixed_choice, template_model

    device = torch.device(device)
    if options.lanes is not None and options.lanes > 1:
        options = dataclasses.replace(options, threads=options.default_threads())
    with torch.random.fork_rng(devices=[]):
        model = create_model(model_name, spec)
    input_shape = (spec.channels, spec.height, spec.width)
    steps = -(-n_train // config.batch_size)
    if options.resolved or not options.autotune:
        result = TuneResult("", options.with_defaults(), planned_steps=steps * config.max_epochs * n_jobs)
    else:
        result = tune_module(
            model, input_shape, config.batch_size, config.precision, device, options,
            planned_steps=steps * config.max_epochs * n_jobs, full_batches=n_train >= config.batch_size,
            cache=cache, label=model_name,
        )

    fusable = is_fusable(template_model(model_name, spec)) and not (config.precision == "fp16" and device.type == "cuda")
    batch, precision = config.batch_size, config.precision
    single_options = result.options
    single = result.images_per_s.get(result.chosen.label)
    if group_size is not None and group_size > 1:
        result.options = dataclasses.replace(single_options, lanes=1)
        result.lanes_reason = "fused groups"
    else:
        choose_lanes(result, model, input_shape, config, device, options, concurrent_jobs, cache, model_name)
    lanes = result.options.lanes or 1
    lanes_speed = result.lanes_images_per_s.get(lanes) if lanes > 1 else None
    if group_size is not None:
        group = fixed_choice(model_name, device, batch, group_size, precision, shared_batches, "fixed")
    elif not fusable or n_jobs == 1:
        reason = "not fusable" if not fusable else "single job"
        group = fixed_choice(model_name, device, batch, 1, precision, shared_batches, reason)
    elif not options.autotune:
        group = fixed_choice(model_name, device, batch, 1, precision, shared_batches, "autotuning off")
    elif options.lanes is not None and options.lanes > 1:
        group = fixed_choice(model_name, device, batch, 1, precision, shared_batches, "lanes given")
    elif too_small_to_measure_groups(result, batch):
        reason = "planned work too small to repay measuring group sizes"
        group = fixed_choice(model_name, device, batch, 1, precision, shared_batches, reason)
    else:
        group = choose_group_size(
            model_name, spec, batch, n_jobs, device, shared=shared_batches, precision=precision,
            cache=cache,
        )
        fused = group.images_per_s.get(group.group_size, 0.0)
        # The rival is what would train otherwise: the lanes where they won, else one network.
        in_lanes = lanes > 1 and lanes_speed is not None
        rival = lanes_speed if in_lanes else single
        if group.group_size > 1 and rival and fused < FUSED_MARGIN * rival:
            alternative = f"{lanes} lanes" if in_lanes else "tuned one-network"
            log.info(
                "autotune %s: fused G=%d (%.0f images/s) is not %.0f%% faster than %s training "
                "(%.0f images/s); training %s",
                model_name, group.group_size, fused, 100 * (FUSED_MARGIN - 1), alternative, rival,
                f"in {lanes} lanes" if in_lanes else "one network at a time",
            )
            group = dataclasses.replace(group, group_size=1, reason=f"{alternative} faster")
        elif group.group_size > 1 and lanes > 1:
            result.options = dataclasses.replace(single_options, lanes=1)
            result.lanes_reason = f"fused G={group.group_size} faster than {lanes} lanes"
    result.group = group
    return result


def _lanes_unmeasured_reason(
    result: TuneResult, device: torch.device, options: ExecutionOptions, lanes: int
) -> str:
    """Return why lanes are not timed for this result, or an empty string when they are."""
    if options.lanes is not None:
        return "given"
    if not options.autotune:
        return "autotuning off"
    if device.type != "cpu":
        return "not a CPU"
    if lanes < 2:
        return "one thread" if torch.get_num_threads() < 2 else "one job"
    if result.group is not None and result.group.group_size > 1:
        return "fused groups"
    if result.options.compile not in (None, "off"):
        return "compiled"
    if options.threads is not None:
        return "threads given"
    return ""


def choose_lanes(
    result: TuneResult,
    model: nn.Module,
    input_shape: Sequence[int],
    config: TrainConfig,
    device: torch.device,
    options: ExecutionOptions,
    concurrent_jobs: int,
    cache: Path | str | None | bool,
    label: str,
    measure_given: bool = False,
) -> None:
    """Set ``result.options.lanes``: the user's value, else one lane per thread where measured to pay.

    The lanes are timed against one network under the options in ``result`` and
    with one thread, in alternating windows (``lanes.measure_lanes``), once per
    cache entry, layout and candidates (``lanes`` in the entry). Each counts its
    sustained images/s, so the faster one-network candidate by that measure also
    sets the thread count when lanes lose. Lanes given by the user are timed only
    with ``measure_given`` (the budget planner needs their speed).
    """
    from engine.training.lanes import measure_lanes

    chosen = result.options
    lanes = options.lanes if options.lanes is not None else min(torch.get_num_threads(), concurrent_jobs)
    reason = _lanes_unmeasured_reason(result, device, options, lanes)
    timed_anyway = reason == "given" and measure_given and lanes > 1 and _eager_on_cpu(result, device)
    if reason and not timed_anyway:
        result.options = dataclasses.replace(chosen, lanes=options.lanes or 1)
        result.lanes_reason = reason
        return
    # Options fixed by the user have no cache entry.
    path = cache_file(cache) if result.key else None
    entry = read_entry(path, result.key)
    layout = "channels_last" if chosen.channels_last else "nchw"
    measured = dict(entry.get("lanes", {}).get(layout, {}))
    # One network is timed again beside the lanes, in alternating windows, so the
    # comparison does not mix timings taken at different times.
    singles = list({c.label: c for c in (result.chosen, dataclasses.replace(result.chosen, threads=1))}.values())
    session = f"{lanes} lanes vs " + " & ".join(sorted(c.label for c in singles))
    tuned_speed = result.images_per_s.get(result.chosen.label)
    planned_s = result.planned_steps * config.batch_size / tuned_speed if tuned_speed else None
    # The lanes and each one-network candidate are timed for this long each.
    budget_s = timing_budget(planned_s, 1 + len(singles), MIN_LANES_BUDGET_S, LANES_BUDGET_S)
    cached = measured.get(session)
    timed_now = False
    if (
        cached is None
        or any(c.label not in cached["one network"] for c in singles)
        or session_timed_s(cached, LANES_BUDGET_S) < 0.999 * budget_s
    ):
        started = time.perf_counter()
        together, alone = measure_lanes(
            model, singles, input_shape, config.batch_size, config.precision, device, lanes, budget_s,
        )
        result.measure_time_s += time.perf_counter() - started
        measured[session] = {"lanes": together, "one network": alone, "timed_s": round(budget_s, 4)}
        result.source = "measured"
        timed_now = True
        if path is not None:
            current = read_entry(path, result.key)
            save_entry(path, result.key, {**current, "lanes": {**current.get("lanes", {}), layout: measured}})
    together, alone = measured[session]["lanes"], measured[session]["one network"]
    best = max(singles, key=lambda c: alone[c.label])
    single = alone[best.label]
    result.lanes_images_per_s = {1: single, lanes: together}
    if reason:
        result.options = dataclasses.replace(chosen, lanes=lanes)
        result.lanes_reason = f"given; measured {together:.0f} images/s against {single:.0f} for one network"
    elif together > LANES_MARGIN * single:
        result.options = dataclasses.replace(chosen, lanes=lanes, threads=1)
        result.lanes_reason = f"measured: {together:.0f} images/s against {single:.0f} for one network"
        # Logged once per timing: a plan with several bucket sizes reads the same timing again.
        log.log(
            logging.INFO if timed_now else logging.DEBUG,
            "autotune %s: %d networks at once, one thread each: %.0f images/s against %.0f one at a time",
            label, lanes, together, single,
        )
    else:
        result.options = dataclasses.replace(chosen, lanes=1, threads=best.threads)
        result.lanes_reason = (
            f"measured: {together:.0f} images/s, not {LANES_MARGIN:.2f}x one network's {single:.0f} "
            f"({best.label})"
        )


def _eager_on_cpu(result: TuneResult, device: torch.device) -> bool:
    """Return whether ``result`` trains eager on a CPU, where lanes can be timed."""
    return device.type == "cpu" and result.options.compile in (None, "off")
