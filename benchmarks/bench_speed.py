"""Speed of one training: loaders, execution options, and the engine against a plain PyTorch loop.

Not part of the test suite; run it explicitly::

    pytest benchmarks/bench_speed.py --benchmark-only -q --benchmark-columns=min,median,rounds

Three groups of cases, each printing a table at the end of its module:

- ``loader``: images/s of one epoch over 25,000 random CIFAR-sized uint8 images, per
  backend (tensor, FFCV, DALI; the last two skip when their extra is missing), and
  the time of one channels_last batch gathered from NCHW rows and from NHWC rows.
- ``step``: training images/s of a shallow CNN step at batch 64 for every
  combination of precision (fp32, bf16), layout (NCHW, channels_last),
  compilation (off, default) and CPU threads (1, the process's count). The ratio
  is to plain eager fp32 NCHW with the process's threads. Candidates are timed in
  interleaved windows, so load from other processes hits them alike. Then lanes
  (one network per thread, all stepping at once) against one network, as
  autotuning times them.
- ``end_to_end``: table10-like work on real CIFAR-10 (N1 of widths 16, 32, 64 on
  D1, then N2 of every width on each N1's labels of D2, a few epochs each) by the
  engine as the recipe command runs it (``run_plan``: autotuned options, fused
  groups or lanes, every network saved), by the one-network trainer alone, and by
  a plain PyTorch loop (fp32, NCHW, one model at a time,
  ``torch.utils.data.DataLoader``) in the same process. The plain loop runs with
  the process's threads and again with one thread, so the share of the speedup
  that comes from the thread count shows.

``$BENCH_THREADS`` sets the process's CPU threads (default: PyTorch's). The
end-to-end case needs real CIFAR-10 in ``$ENGINE_DATA_DIR`` or ``../shared/data``
beside the checkout, and skips otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.data.loaders import TensorLoader, make_loader, scale_pixels, to_layout
from engine.data.splits import to_float
from engine.models import create_model
from engine.training import TrainConfig, autotune, predict, train_network
from engine.training.autotune import Candidate, make_step, thread_count, time_candidates
from engine.training.execution import ExecutionOptions
from engine.training.lanes import measure_lanes

if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["BENCH_THREADS"]))
DEVICE = torch.device("cpu")
BATCH = 64
LOADER_IMAGES = 25_000
STEP_WIDTHS = (16, 128)
STEP_BUDGET_S = {16: 1.5, 128: 4.0}  # timed seconds per candidate, over 3 interleaved windows
E2E_WIDTHS = (16, 32, 64)
E2E_SUBSET = 1000
E2E_EPOCHS = 3
E2E_ROUNDS = 2  # rounds of the plain loop and of the cached recipe path

# Rows of the summary tables printed at the end of the module.
_ROWS: dict[str, list[str]] = {"loader": [], "step": [], "lanes": [], "end_to_end": []}


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    titles = {
        "loader": "loader throughput (one epoch, 25,000 images, batch 64)",
        "step": "training step throughput, shallow CNN, batch 64 (ratio to eager fp32 NCHW, process threads)",
        "lanes": "lanes against one network, fp32 channels_last, sustained images/s (ratio of the lanes)",
        "end_to_end": "table10-like work: engine (autotuned) against a plain PyTorch loop",
    }
    # Output of a fixture's teardown is captured like a test's, so capturing is
    # paused to put the tables on the terminal.
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        for group, rows in _ROWS.items():
            if rows:
                reporter.write_sep("-", titles[group])
                for row in rows:
                    reporter.write_line(row)


def _real_data_dir() -> str:
    """Return the folder of real CIFAR-10: ``$ENGINE_DATA_DIR`` or ``../shared/data``, or skip."""
    repo = Path(__file__).resolve().parents[1]
    for candidate in (os.environ.get("ENGINE_DATA_DIR"), repo.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "cifar-10-batches-py" / "data_batch_1").is_file():
            return str(candidate)
    pytest.skip("real CIFAR-10 not found: set ENGINE_DATA_DIR")


def _real_cifar():
    """Return real CIFAR-10 from ``$ENGINE_DATA_DIR`` or ``../shared/data``, or skip."""
    from engine.data import load_dataset

    return load_dataset("cifar10", _real_data_dir())


# ---------------------------------------------------------------- loaders


def _skip_unless_installed(module: str, reason: str) -> None:
    # find_spec does not import: importing FFCV sets PyTorch's thread count to 1.
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def loader_set():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (LOADER_IMAGES, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (LOADER_IMAGES,), generator=generator)
    return images, labels


@pytest.mark.benchmark(group="loader")
@pytest.mark.parametrize("backend", ["tensor", "ffcv", "dali"])
def test_loader_epoch(benchmark, backend, loader_set, tmp_path):
    if backend == "ffcv":
        _skip_unless_installed("ffcv", "FFCV is not installed (pip install -e '.[ffcv]')")
    if backend == "dali":
        _skip_unless_installed("nvidia.dali", "DALI is not installed (pip install -e '.[dali]')")
    started = time.perf_counter()
    loader = make_loader(backend, *loader_set, BATCH, DEVICE, cache_dir=str(tmp_path))
    setup_s = time.perf_counter() - started
    generator = torch.Generator().manual_seed(0)

    def epoch() -> int:
        return sum(len(y) for _, y in loader.epoch(generator))

    epoch()  # warm-up: FFCV compiles its pipeline, DALI allocates its buffers
    assert benchmark.pedantic(epoch, rounds=3, iterations=1) == LOADER_IMAGES
    images_per_s = LOADER_IMAGES / benchmark.stats.stats.min
    benchmark.extra_info.update(images_per_s=images_per_s, setup_s=setup_s)
    _ROWS["loader"].append(
        f"{backend:<7} {images_per_s:>10,.0f} images/s (fastest of 3 epochs)   setup {setup_s:5.1f} s"
    )
    loader.close()


@pytest.mark.benchmark(group="loader")
@pytest.mark.parametrize("rows", ["nchw", "nhwc"])
def test_channels_last_batch(benchmark, rows, loader_set):
    """One channels_last batch of 64 on one thread: converted from NCHW rows, or gathered from NHWC rows."""
    images, labels = loader_set
    index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:BATCH]
    loader = TensorLoader(images, labels, BATCH, DEVICE, channels_last=True)

    def batch() -> torch.Tensor:
        if rows == "nchw":
            return to_layout(scale_pixels(images.index_select(0, index)), True)
        return loader.batch(index)

    with thread_count(1):
        assert torch.equal(batch(), to_float(images[index]))
        benchmark.pedantic(batch, rounds=200, iterations=1, warmup_rounds=10)
    median_us = 1e6 * benchmark.stats.stats.median
    _ROWS["loader"].append(f"channels_last batch of {BATCH} from {rows} rows: {median_us:7.1f} us (median of 200)")


# ---------------------------------------------------------------- training steps


@pytest.mark.benchmark(group="step")
@pytest.mark.parametrize("width", STEP_WIDTHS)
def test_step_options(benchmark, width):
    model = create_model(f"shallow_cnn_w{width}")
    process_threads = torch.get_num_threads()
    steps, threads, compile_s = {}, {}, {}
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            for mode in ("off", "default"):
                for count in sorted({1, process_threads}):
                    candidate = Candidate(channels_last, mode, count)
                    label = f"{precision} {candidate.label}"
                    step = make_step(model, candidate, (3, 32, 32), BATCH, precision, DEVICE)
                    started = time.perf_counter()
                    with thread_count(count):
                        step(0)
                    compile_s[label] = time.perf_counter() - started
                    steps[label], threads[label] = step, count
    seconds = time_candidates(steps, DEVICE, STEP_BUDGET_S[width], threads=threads)
    baseline = f"fp32 {Candidate(False, 'off', process_threads).label}"

    def plain_step() -> None:
        steps[baseline](0)

    benchmark.pedantic(plain_step, rounds=5, iterations=1)
    benchmark.extra_info.update({label: BATCH / s for label, s in seconds.items()})
    # Lanes: one network per thread, all stepping at once, against one network with
    # the process's threads and with one, timed as autotuning times them (sustained
    # images/s over alternating windows, not the fastest window).
    lanes = process_threads
    singles = [Candidate(True, "off", count) for count in sorted({1, process_threads})]
    together, alone = measure_lanes(model, singles, (3, 32, 32), BATCH, "fp32", DEVICE, lanes, 2 * STEP_BUDGET_S[width])
    benchmark.extra_info.update(lanes_images_per_s=together, lanes_single_images_per_s=alone)
    _ROWS["lanes"].append(
        f"w{width:<5} {lanes} lanes of channels_last,threads=1 {together:>8,.0f} images/s   one network: "
        + ", ".join(f"{label.split(',')[-1]} {value:,.0f} ({together / value:.2f}x)" for label, value in alone.items())
    )
    for label, s in sorted(seconds.items(), key=lambda item: item[1]):
        first = f"   first step {compile_s[label]:5.1f} s" if "compile=default" in label else ""
        _ROWS["step"].append(
            f"w{width:<5} {label:<44} {BATCH / s:>8,.0f} images/s  {seconds[baseline] / s:5.2f}x{first}"
        )


# ---------------------------------------------------------------- end to end


def _plain_train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
    """Train the way a plain PyTorch script does: float tensors, a DataLoader, NCHW fp32."""
    dataset = torch.utils.data.TensorDataset(images.float() / 127.5 - 1.0, labels)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(E2E_EPOCHS):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _plain_predict(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(images.float() / 127.5 - 1.0).argmax(1).numpy()


def _engine_train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
    config = TrainConfig(max_epochs=E2E_EPOCHS)
    train_network(model, images, labels, config, seed, execution=ExecutionOptions())


def _engine_train_bf16(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
    config = TrainConfig(max_epochs=E2E_EPOCHS, precision="bf16")
    train_network(model, images, labels, config, seed, execution=ExecutionOptions(amp="bf16"))


def _predict_bf16(model: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    return predict(model, images, precision="bf16")


def _grid(cifar, split, train, predict_labels) -> tuple[float, list[float]]:
    """Train N1 of every width on D1, then N2 of every width on each N1's D2 labels.

    Returns the wall time and the learnability of every (N1, N2) pair on D3.
    """
    from engine.data import n1_training_set

    started = time.perf_counter()
    d1_images, d1_labels = n1_training_set(cifar, split, "true_data")
    d2 = cifar.train_images[torch.from_numpy(split.d2)]
    d3 = cifar.test_images[torch.from_numpy(split.d3)]
    agreements = []
    for n1_width in E2E_WIDTHS:
        torch.manual_seed(n1_width)
        n1 = create_model(f"shallow_cnn_w{n1_width}")
        train(n1, d1_images, d1_labels, n1_width)
        n1_d2 = torch.from_numpy(np.asarray(predict_labels(n1, d2)).astype(np.int64))
        n1_d3 = predict_labels(n1, d3)
        for n2_width in E2E_WIDTHS:
            torch.manual_seed(1000 + n2_width)
            n2 = create_model(f"shallow_cnn_w{n2_width}")
            train(n2, d2, n1_d2, n2_width)
            agreements.append(float((np.asarray(predict_labels(n2, d3)) == np.asarray(n1_d3)).mean()))
    return time.perf_counter() - started, agreements


def _recipe_path(store_dir: Path) -> tuple[float, list[float], dict]:
    """Run the same grid as the recipe command does: run_plan, fused groups, lanes, autotuning.

    Returns the wall time, the learnability of every (N1, N2) pair on D3, and what
    autotuning chose per width (lanes and threads, or the fused group).
    """
    from engine.experiments.jobs import DataContext
    from engine.experiments.plan import build_plan
    from engine.experiments.recipes import load_recipe
    from engine.experiments.runner import InProcessExecutor, run_plan
    from engine.results.store import RunStore

    models = tuple(f"shallow_cnn_w{width}" for width in E2E_WIDTHS)
    recipe = load_recipe("table10").narrowed(n1=models, n2=models, seeds=1)
    plan = build_plan(recipe, TrainConfig(max_epochs=E2E_EPOCHS), E2E_SUBSET)
    data = DataContext("cifar10", _real_data_dir())
    data.split(0, E2E_SUBSET)  # loads the data before the clock starts, as the grids above
    started = time.perf_counter()
    executor = InProcessExecutor(data, DEVICE, execution=ExecutionOptions())
    store = RunStore(store_dir)
    report = run_plan(plan, store, executor, progress=False)
    wall_s = time.perf_counter() - started
    assert len(report.trained) == len(plan.jobs)
    n2_jobs = [job for job in plan.jobs if job.role == "n2"]
    agreements = [
        float((store.predictions(job.key)["d3"] == store.predictions(job.parent)["d3"]).mean()) for job in n2_jobs
    ]
    chosen = {}
    for job in plan.jobs:
        record = store.record(job.key)
        execution = record["execution"]
        chosen[job.model.removeprefix("shallow_cnn_")] = (
            f"{record['trainer']}, {execution.get('lanes', 1)} lanes x {execution['threads']} threads"
        )
    return wall_s, agreements, chosen


@pytest.mark.benchmark(group="end_to_end")
def test_end_to_end_table10_like(benchmark, monkeypatch, tmp_path):
    from engine.data import make_split

    cifar = _real_cifar()
    split = make_split(cifar, 0, subset=E2E_SUBSET)
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "autotune.json"))
    load = os.getloadavg()[0]

    # First the recipe command's path with an empty autotune cache, which it fills,
    # then the plain loop with one thread. Then the plain loop with the process's
    # threads and the cached recipe path run twice, interleaved, and the faster round
    # of each counts, so a burst of load on the machine hits both alike. Last the
    # one-network trainer alone (train_network per network, cache filled).
    recipe_cold_s, _, _ = _recipe_path(tmp_path / "cold")
    with thread_count(1):
        plain_one_thread_s, _ = _grid(cifar, split, _plain_train, _plain_predict)
    plain_rounds, recipe_rounds = [], []
    for round_index in range(E2E_ROUNDS):
        plain_rounds.append(_grid(cifar, split, _plain_train, _plain_predict))
        store_dir = tmp_path / f"warm{round_index}"
        if round_index == E2E_ROUNDS - 1:
            # pytest-benchmark's own table shows the last round.
            recipe_rounds.append(benchmark.pedantic(_recipe_path, args=(store_dir,), rounds=1, iterations=1))
        else:
            recipe_rounds.append(_recipe_path(store_dir))
    plain_s, plain_agree = min(plain_rounds, key=lambda result: result[0])
    recipe_s, recipe_agree, chosen = min(recipe_rounds, key=lambda result: result[0])
    engine_warm_s, engine_agree = _grid(cifar, split, _engine_train, predict)
    # bf16 autocast changes the protocol's precision: only with the user's --amp bf16.
    engine_bf16_s, bf16_agree = _grid(cifar, split, _engine_train_bf16, _predict_bf16)
    networks = len(E2E_WIDTHS) * (1 + len(E2E_WIDTHS))
    benchmark.extra_info.update(
        plain_s=plain_s, plain_one_thread_s=plain_one_thread_s, recipe_cold_s=recipe_cold_s, recipe_s=recipe_s,
        engine_warm_s=engine_warm_s, engine_bf16_s=engine_bf16_s, chosen=chosen, threads=torch.get_num_threads(),
        plain_rounds_s=[result[0] for result in plain_rounds], recipe_rounds_s=[result[0] for result in recipe_rounds],
        load_average_start=load, load_average_end=os.getloadavg()[0],
    )
    rows = _ROWS["end_to_end"]
    rows.append(
        f"{networks} networks (widths {E2E_WIDTHS}), {E2E_SUBSET} images per split, "
        f"{E2E_EPOCHS} epochs each, batch {BATCH}; process threads {torch.get_num_threads()}; "
        f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    rounds = ", ".join(f"{result[0]:.1f}" for result in plain_rounds)
    rows.append(f"plain PyTorch loop       {plain_s:7.1f} s   (process threads; rounds {rounds} s)")
    rows.append(f"plain loop, 1 thread     {plain_one_thread_s:7.1f} s   {plain_s / plain_one_thread_s:5.2f}x")
    rows.append(
        f"engine, autotune cold    {recipe_cold_s:7.1f} s   {plain_s / recipe_cold_s:5.2f}x faster than the plain loop "
        "(recipe path: run_plan)"
    )
    rounds = ", ".join(f"{result[0]:.1f}" for result in recipe_rounds)
    rows.append(f"engine, autotune cached  {recipe_s:7.1f} s   {plain_s / recipe_s:5.2f}x (rounds {rounds} s)")
    rows.append(f"  chosen: {chosen}")
    rows.append(f"one network at a time    {engine_warm_s:7.1f} s   {plain_s / engine_warm_s:5.2f}x (train_network, cached)")
    rows.append(
        f"engine, --amp bf16       {engine_bf16_s:7.1f} s   {plain_s / engine_bf16_s:5.2f}x "
        "(autotune cold for bf16; the precision is part of the protocol)"
    )
    rows.append(
        f"mean learnability on D3: engine {100 * np.mean(recipe_agree):.1f}%, one at a time "
        f"{100 * np.mean(engine_agree):.1f}%, bf16 {100 * np.mean(bf16_agree):.1f}%, "
        f"plain {100 * np.mean(plain_agree):.1f}% (other batch orders and rounding: equal only within seed noise)"
    )
