"""Benchmarks of the numba statistics kernels against their NumPy references.

Run with `pytest benchmarks/bench_kernels.py --benchmark-only`. Each kernel is
called once before timing, so compilation or cache loading stays out of the
steady-state numbers. The first-call benchmarks measure those costs separately, in
fresh processes.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import kernels
from kernels import reference

pytestmark = pytest.mark.benchmark

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
# Numbers of timed rounds. The NumPy baselines of the large cases take up to a
# second per call, so they get fewer rounds.
KERNEL_ROUNDS = 200
REFERENCE_ROUNDS = 10


def labels(shape, seed=0):
    """Draw int64 labels in [0, NUM_CLASSES), the dtype that torch.argmax returns."""
    return np.random.default_rng(seed).integers(0, NUM_CLASSES, size=shape)


def correlated_predictions(examples):
    """Return (y_true, n1_pred, n2_pred) for `examples` examples.

    N1 keeps the true label on 80% of the examples and N2 keeps N1's label on 90%.
    The other labels are drawn uniformly, so a few of them match by chance.
    """
    rng = np.random.default_rng(1)
    truth = rng.integers(0, NUM_CLASSES, examples)
    first = np.where(rng.random(examples) < 0.8, truth, rng.integers(0, NUM_CLASSES, examples))
    second = np.where(rng.random(examples) < 0.9, first, rng.integers(0, NUM_CLASSES, examples))
    return truth, first, second


def run_case(benchmark, medians, case, implementation, function, *args):
    """Time `function(*args)` after one untimed call, and store its median."""
    function(*args)
    benchmark.group = case
    rounds = KERNEL_ROUNDS if implementation == "numba" else REFERENCE_ROUNDS
    benchmark.pedantic(function, args=args, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:
        medians.setdefault(case, {})[implementation] = benchmark.stats.stats.median


IMPLEMENTATIONS = ["numba", "numpy"]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("rows", [5, 64, 256])
def test_pairwise_agreement(benchmark, medians, rows, implementation):
    function = {
        "numba": kernels.pairwise_agreement,
        "numpy": reference.pairwise_agreement_reference,
    }[implementation]
    case = f"pairwise_agreement k={rows} n=10,000"
    run_case(benchmark, medians, case, implementation, function, labels((rows, 10_000)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_distinct_prediction_counts(benchmark, medians, implementation):
    function = {
        "numba": kernels.distinct_prediction_counts,
        "numpy": reference.distinct_prediction_counts_reference,
    }[implementation]
    case = "distinct_prediction_counts k=5 n=1,000,000"
    run_case(benchmark, medians, case, implementation, function, labels((5, 1_000_000)))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_confusion_matrix(benchmark, medians, implementation):
    function = {
        "numba": kernels.confusion_matrix,
        "numpy": reference.confusion_matrix_reference,
    }[implementation]
    truth, first, _ = correlated_predictions(1_000_000)
    case = "confusion_matrix n=1,000,000"
    run_case(benchmark, medians, case, implementation, function, truth, first, NUM_CLASSES)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_class_counts(benchmark, medians, implementation):
    function = {
        "numba": kernels.class_counts,
        "numpy": reference.class_counts_reference,
    }[implementation]
    case = "class_counts n=1,000,000"
    run_case(benchmark, medians, case, implementation, function, labels(1_000_000), NUM_CLASSES)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_tlp_plp_table(benchmark, medians, implementation):
    function = {
        "numba": kernels.tlp_plp_table,
        "numpy": reference.tlp_plp_table_reference,
    }[implementation]
    case = "tlp_plp_table n=1,000,000"
    run_case(benchmark, medians, case, implementation, function, *correlated_predictions(1_000_000))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_agreement(benchmark, medians, implementation):
    function = {"numba": kernels.agreement, "numpy": reference.agreement_reference}[implementation]
    _, first, second = correlated_predictions(1_000_000)
    case = "agreement n=1,000,000"
    run_case(benchmark, medians, case, implementation, function, first, second)


# First calls in fresh processes ------------------------------------------------

FIRST_CALL_SCRIPT = """
import json
import time

import numpy as np

import kernels

vector = np.random.default_rng(0).integers(0, 10, 1_000_000)
matrix = np.random.default_rng(1).integers(0, 10, (5, 1_000_000))
calls = {
    "pairwise_agreement": lambda: kernels.pairwise_agreement(matrix[:, :10_000]),
    "agreement": lambda: kernels.agreement(vector, vector),
    "class_counts": lambda: kernels.class_counts(vector, 10),
    "confusion_matrix": lambda: kernels.confusion_matrix(vector, vector, 10),
    "tlp_plp_table": lambda: kernels.tlp_plp_table(vector, vector, vector),
    "distinct_prediction_counts": lambda: kernels.distinct_prediction_counts(matrix),
}
seconds = {}
for name, call in calls.items():
    start = time.perf_counter()
    call()
    seconds[name] = time.perf_counter() - start
print(json.dumps(seconds))
"""


def first_call_seconds(cache_dir):
    """Run every kernel once in a fresh process that caches into `cache_dir`.

    The inputs are large enough (1,000,000 examples) to take the parallel paths on
    a machine with 2 or more threads, so every core is compiled or loaded.

    Returns:
        Seconds of the first call of each public kernel in that process.
    """
    environment = dict(os.environ)
    environment["NUMBA_CACHE_DIR"] = str(cache_dir)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")])
    )
    completed = subprocess.run(
        [sys.executable, "-c", FIRST_CALL_SCRIPT],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO_ROOT,
        timeout=600,
        check=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_first_call_empty_cache(benchmark, first_calls):
    # Every round gets its own empty cache directory, so every round compiles.
    def compile_everything():
        with tempfile.TemporaryDirectory() as cache_dir:
            return first_call_seconds(cache_dir)

    benchmark.group = "first call in a fresh process"
    seconds = benchmark.pedantic(compile_everything, rounds=1, iterations=1)
    first_calls["empty cache (compiles)"] = seconds


def test_first_call_warm_cache(benchmark, first_calls):
    with tempfile.TemporaryDirectory() as cache_dir:
        first_call_seconds(cache_dir)
        benchmark.group = "first call in a fresh process"
        seconds = benchmark.pedantic(first_call_seconds, args=(cache_dir,), rounds=3, iterations=1)
    first_calls["warm cache (loads)"] = seconds
