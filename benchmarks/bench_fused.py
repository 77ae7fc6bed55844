"""Training throughput of fused groups of shallow CNNs against one-by-one eager training.

Not part of the test suite; run it explicitly::

    pytest benchmarks/bench_fused.py -q --benchmark-columns=min,median,rounds

Every case trains G shallow CNNs of one width at batch 64 on random uint8 images held
on the device, and reports images/s summed over the G networks:

- ``one_by_one``: G ordinary models, each with its own ``torch.optim.SGD``, stepped
  one after another (the one-network trainer's step);
- ``fused_independent``: one fused module, every member with its own batch;
- ``fused_shared``: one fused module, all members on the same batch (dense first layer).

Throughput is computed from the fastest round, because that round is the one least
disturbed by other processes. A table of it and of the speedups over one-by-one is
printed at the end.

The device is ``$BENCH_DEVICE`` if set, else CUDA when available, else the CPU.
``$BENCH_THREADS`` sets the number of CPU threads (default: PyTorch's). Timed rounds
end with ``torch.cuda.synchronize`` on a GPU, so queued work is counted.
"""

from __future__ import annotations

import os
from typing import Callable

import pytest
import torch

from engine.fused.strategy import make_fused_step, make_plain_step
from engine.models import CIFAR10

DEVICE = torch.device(os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
BATCH_SIZE = 64
GROUP_SIZES = (1, 8, 35)
WIDTHS = (16, 256)
MODES = ("one_by_one", "fused_independent", "fused_shared")
STEPS_PER_ROUND = 1  # steps of every network in one timed round
ROUNDS = {16: 8, 256: 3}  # timed rounds per width, after one warm-up round; the median counts
POOL = 4 * BATCH_SIZE  # random images the batches are drawn from

# images/s per (width, group size, mode), filled by the cases, printed at the end.
_RESULTS: dict[tuple[int, int, str], float] = {}


def _synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _make_round(width: int, group_size: int, mode: str) -> Callable[[], None]:
    """Return one timed round: ``STEPS_PER_ROUND`` steps of every one of the G networks."""
    model = f"shallow_cnn_w{width}"
    torch.manual_seed(0)
    if mode == "one_by_one":
        steps = [make_plain_step(model, CIFAR10, BATCH_SIZE, DEVICE, "fp32", POOL) for _ in range(group_size)]
    else:
        shared = mode == "fused_shared"
        steps = [make_fused_step(model, CIFAR10, BATCH_SIZE, group_size, DEVICE, "fp32", shared, POOL)]
    counter = iter(range(1 << 30))

    def run_round() -> None:
        for step in steps:
            for _ in range(STEPS_PER_ROUND):
                step(next(counter))
        _synchronize()

    return run_round


@pytest.fixture(scope="module", autouse=True)
def summary_table(request: pytest.FixtureRequest):
    yield
    if not _RESULTS:
        return
    where = f"{torch.get_num_threads()} CPU threads" if DEVICE.type == "cpu" else torch.cuda.get_device_name(DEVICE)
    lines = [
        "",
        f"fused training throughput, images/s summed over G networks (fastest round); {DEVICE}, {where}",
        f"{'width':>5} {'G':>3} {'one by one':>12} {'fused indep':>12} {'fused shared':>12}"
        f" {'x indep':>8} {'x shared':>8}",
    ]
    for width in WIDTHS:
        for group_size in GROUP_SIZES:
            row = [_RESULTS.get((width, group_size, mode)) for mode in MODES]
            if row[0] is None:
                continue
            cells = " ".join(f"{v:12.0f}" if v is not None else f"{'-':>12}" for v in row)
            ratios = " ".join(f"{v / row[0]:8.2f}" if v is not None else f"{'-':>8}" for v in row[1:])
            lines.append(f"{width:>5} {group_size:>3} {cells} {ratios}")
    # Output capture would swallow the table at module teardown, so it is switched off.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n".join(lines))


@pytest.mark.benchmark
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("width", WIDTHS)
def test_training_throughput(benchmark, width: int, group_size: int, mode: str) -> None:
    run_round = _make_round(width, group_size, mode)
    benchmark.group = f"shallow_cnn_w{width} G={group_size}"
    benchmark.pedantic(run_round, rounds=ROUNDS[width], iterations=1, warmup_rounds=1)
    images = group_size * BATCH_SIZE * STEPS_PER_ROUND
    images_per_s = images / benchmark.stats.stats.min
    _RESULTS[width, group_size, mode] = images_per_s
    benchmark.extra_info["images_per_s"] = round(images_per_s, 1)
    baseline = _RESULTS.get((width, group_size, "one_by_one"))
    if baseline is not None and mode != "one_by_one":
        benchmark.extra_info["speedup_vs_one_by_one"] = round(images_per_s / baseline, 3)
