"""Tests of the numba statistics kernels against their plain NumPy references."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

import kernels
from kernels import _agreement, _counts, _distinct, _inputs
from kernels.reference import (
    agreement_reference,
    class_counts_reference,
    confusion_matrix_reference,
    distinct_prediction_counts_reference,
    pairwise_agreement_reference,
    tlp_plp_table_reference,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

DTYPES = [
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
]
LAYOUTS = ["contiguous", "strided", "reversed", "fortran"]

# (k, n) shapes around the edges of the kernels: odd k (the pair kernel pads to
# even), and n below, at and above multiples of the 64-example word and of the
# 512-example block.
MATRIX_SHAPES = [(1, 1), (2, 7), (3, 64), (4, 65), (5, 513), (7, 130), (33, 200), (64, 1000)]
VECTOR_LENGTHS = [1, 2, 63, 64, 65, 1000, 4099]
# Class counts that need 1, 2, 3 and 4 groups of 4 bit planes in the pair kernel.
# The vector kernels skip 5000 because its confusion matrix has 25M cells.
CLASS_COUNTS = [1, 2, 10, 16, 17, 100, 300, 5000]
VECTOR_CLASS_COUNTS = [1, 2, 10, 16, 17, 100, 300]

# The jitted functions that the public wrappers call from Python. Each must be
# compiled for exactly one argument type.
ENTRY_KERNELS = [
    _inputs._label_range,
    _agreement._count_equal,
    _agreement._pack_bit_planes,
    _agreement._pack_bit_planes_parallel,
    _agreement._pairwise_mismatches,
    _agreement._pairwise_mismatches_parallel,
    _counts._add_class_counts,
    _counts._class_counts_parallel,
    _counts._add_pair_counts,
    _counts._confusion_counts_parallel,
    _counts._tlp_plp_sums,
    _distinct._add_distinct_counts,
    _distinct._distinct_counts_parallel,
]


def random_labels(rng, shape, classes, dtype):
    """Draw labels in [0, classes), capped so that they fit in `dtype`."""
    high = min(classes, int(np.iinfo(dtype).max) + 1)
    return rng.integers(0, high, size=shape).astype(dtype)


def with_layout(array, layout):
    """Return an array equal to `array` whose memory layout is `layout`."""
    if layout == "contiguous":
        return np.ascontiguousarray(array)
    if layout == "strided":
        wide = np.zeros(array.shape[:-1] + (2 * array.shape[-1],), array.dtype)
        wide[..., ::2] = array
        return wide[..., ::2]
    if layout == "reversed":
        return np.ascontiguousarray(array[..., ::-1])[..., ::-1]
    if layout == "fortran":
        return np.asfortranarray(array)
    raise ValueError(f"unknown layout {layout!r}")


def dtype_id(value):
    """Return the test id of a dtype parameter, such as "int8"."""
    return value.__name__ if isinstance(value, type) else str(value)


# Reference comparisons -------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_pairwise_agreement_matches_reference(dtype, layout):
    rng = np.random.default_rng(1)
    for rows, examples in MATRIX_SHAPES:
        for classes in CLASS_COUNTS:
            labels = with_layout(random_labels(rng, (rows, examples), classes, dtype), layout)
            expected = pairwise_agreement_reference(labels)
            result = kernels.pairwise_agreement(labels)
            assert result.dtype == np.float64
            np.testing.assert_array_equal(
                result, expected, err_msg=f"k={rows} n={examples} classes={classes}"
            )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_distinct_prediction_counts_matches_reference(dtype, layout):
    rng = np.random.default_rng(2)
    for rows, examples in MATRIX_SHAPES:
        for classes in CLASS_COUNTS:
            labels = with_layout(random_labels(rng, (rows, examples), classes, dtype), layout)
            expected = distinct_prediction_counts_reference(labels)
            result = kernels.distinct_prediction_counts(labels)
            assert result.dtype == np.int64
            np.testing.assert_array_equal(
                result, expected, err_msg=f"k={rows} n={examples} classes={classes}"
            )


@pytest.mark.parametrize("layout", ["contiguous", "strided", "reversed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_vector_kernels_match_reference(dtype, layout):
    rng = np.random.default_rng(3)
    for examples in VECTOR_LENGTHS:
        for classes in VECTOR_CLASS_COUNTS:
            cap = min(classes, int(np.iinfo(dtype).max) + 1)
            truth, first, second = (
                with_layout(random_labels(rng, examples, classes, dtype), layout)
                for _ in range(3)
            )
            case = f"n={examples} classes={classes}"

            result = kernels.agreement(first, second)
            assert isinstance(result, float), case
            assert result == agreement_reference(first, second), case

            counts = kernels.class_counts(first, cap)
            assert counts.dtype == np.int64, case
            np.testing.assert_array_equal(
                counts, class_counts_reference(first, cap), err_msg=case
            )

            confusion = kernels.confusion_matrix(truth, first, cap)
            assert confusion.dtype == np.int64, case
            np.testing.assert_array_equal(
                confusion, confusion_matrix_reference(truth, first, cap), err_msg=case
            )

            table = kernels.tlp_plp_table(truth, first, second)
            assert table.dtype == np.int64, case
            np.testing.assert_array_equal(
                table, tlp_plp_table_reference(truth, first, second), err_msg=case
            )


def test_kernels_match_reference_on_many_chunks():
    # Enough examples for the histogram kernels to split the work into 2 or more
    # chunks on a machine with 2 or more threads.
    examples = 2 * max(_counts._MIN_EXAMPLES_PER_CHUNK, _distinct._MIN_EXAMPLES_PER_CHUNK) + 1
    rng = np.random.default_rng(4)
    truth = rng.integers(0, 10, examples)
    first = np.where(rng.random(examples) < 0.8, truth, rng.integers(0, 10, examples))
    second = np.where(rng.random(examples) < 0.9, first, rng.integers(0, 10, examples))
    stacked = np.stack([truth, first, second])

    np.testing.assert_array_equal(
        kernels.confusion_matrix(truth, first, 10), confusion_matrix_reference(truth, first, 10)
    )
    np.testing.assert_array_equal(
        kernels.class_counts(first, 10), class_counts_reference(first, 10)
    )
    np.testing.assert_array_equal(
        kernels.tlp_plp_table(truth, first, second),
        tlp_plp_table_reference(truth, first, second),
    )
    np.testing.assert_array_equal(
        kernels.distinct_prediction_counts(stacked),
        distinct_prediction_counts_reference(stacked),
    )
    assert kernels.agreement(first, second) == agreement_reference(first, second)


@pytest.mark.parametrize("chunks", [1, 2, 3, 7])
def test_parallel_histograms_independent_of_chunks(chunks):
    # The public functions pick the chunk count from the machine's thread count, so
    # the merge of the private histograms is checked here for other counts too.
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 12, 10_001)
    predicted = rng.integers(0, 12, 10_001)
    np.testing.assert_array_equal(
        _counts._confusion_counts_parallel(truth, predicted, 12, chunks),
        confusion_matrix_reference(truth, predicted, 12),
    )
    np.testing.assert_array_equal(
        _counts._class_counts_parallel(truth, 12, chunks), class_counts_reference(truth, 12)
    )
    for small_labels, classes in [(True, 4), (True, 64), (False, 4), (False, 1000)]:
        stacked = rng.integers(0, classes, (6, 10_001))
        np.testing.assert_array_equal(
            _distinct._distinct_counts_parallel(stacked, small_labels, chunks),
            distinct_prediction_counts_reference(stacked),
            err_msg=f"small_labels={small_labels} classes={classes}",
        )


@pytest.mark.parametrize("rows", [1, 2, 5, 64])
@pytest.mark.parametrize("planes", [4, 8, 12])
def test_parallel_pairwise_cores_match_serial(rows, planes):
    # The public function uses the parallel cores only from about 10^6 labels on.
    labels = np.random.default_rng(6).integers(0, 2 ** (planes - 1) + 1, (rows, 1000))
    serial_bits, serial_low, serial_high = _agreement._pack_bit_planes(labels, planes)
    bits, low, high = _agreement._pack_bit_planes_parallel(labels, planes)
    np.testing.assert_array_equal(bits, serial_bits)
    assert (low, high) == (serial_low, serial_high) == (labels.min(), labels.max())

    bits = bits.reshape(bits.shape[0], planes // 4, 4, bits.shape[2])
    expected = (1000 * (1 - pairwise_agreement_reference(labels))).round().astype(np.int64)
    np.testing.assert_array_equal(_agreement._pairwise_mismatches(bits, rows), expected)
    np.testing.assert_array_equal(_agreement._pairwise_mismatches_parallel(bits, rows), expected)


def test_large_inputs_take_parallel_paths_correctly():
    labels = np.random.default_rng(7).integers(0, 10, (256, 4096))
    pair_words = 256 * 257 // 2 * 4096 // 64
    assert labels.size >= _agreement._PARALLEL_MIN_LABELS
    assert pair_words >= _agreement._PARALLEL_MIN_PAIR_WORDS
    np.testing.assert_array_equal(
        kernels.pairwise_agreement(labels), pairwise_agreement_reference(labels)
    )


# Edge cases ------------------------------------------------------------------


def test_pairwise_agreement_empty_shapes():
    no_rows = kernels.pairwise_agreement(np.zeros((0, 10), np.int64))
    assert no_rows.shape == (0, 0)
    assert no_rows.dtype == np.float64

    no_examples = kernels.pairwise_agreement(np.zeros((3, 0), np.int64))
    assert no_examples.shape == (3, 3)
    assert np.isnan(no_examples).all()


def test_pairwise_agreement_known_values():
    predictions = np.array([[0, 1, 2, 3], [0, 1, 0, 0], [1, 1, 2, 3]])
    expected = np.array([[1.0, 0.5, 0.75], [0.5, 1.0, 0.25], [0.75, 0.25, 1.0]])
    np.testing.assert_array_equal(kernels.pairwise_agreement(predictions), expected)
    np.testing.assert_array_equal(kernels.pairwise_agreement(predictions[:1]), [[1.0]])


def test_pairwise_agreement_large_labels():
    # Labels near the int64 maximum need 63 bit planes, i.e. 16 plane groups.
    rng = np.random.default_rng(8)
    choices = np.array([0, 1, 2**40, 2**62 + 5, np.iinfo(np.int64).max])
    labels = choices[rng.integers(0, len(choices), (9, 300))]
    np.testing.assert_array_equal(
        kernels.pairwise_agreement(labels), pairwise_agreement_reference(labels)
    )
    np.testing.assert_array_equal(
        kernels.distinct_prediction_counts(labels),
        distinct_prediction_counts_reference(labels),
    )


def test_pairwise_agreement_symmetric_unit_diagonal():
    labels = np.random.default_rng(9).integers(0, 10, (20, 777))
    result = kernels.pairwise_agreement(labels)
    np.testing.assert_array_equal(result, result.T)
    np.testing.assert_array_equal(np.diag(result), np.ones(20))


def test_agreement_empty_is_nan():
    assert np.isnan(kernels.agreement(np.array([], np.int64), np.array([], np.int64)))
    assert np.isnan(kernels.agreement(np.array([], np.int8), np.array([], np.uint64)))


def test_empty_list_rejected_as_float():
    # np.asarray([]) has dtype float64, so an empty list is not integer labels.
    with pytest.raises(ValueError, match="a must contain integer class labels, got dtype float64"):
        kernels.agreement([], [])


def test_agreement_accepts_lists():
    assert kernels.agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert kernels.agreement([5], [5]) == 1.0


def test_mixed_dtypes_accepted():
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 10, 500)
    first = truth.astype(np.uint8)
    first[::3] = 0
    second = first.astype(np.int16)[::-1].copy()[::-1]
    assert kernels.agreement(truth.astype(np.int8), first) == agreement_reference(truth, first)
    np.testing.assert_array_equal(
        kernels.confusion_matrix(truth.astype(np.uint64), first, 10),
        confusion_matrix_reference(truth, first, 10),
    )
    np.testing.assert_array_equal(
        kernels.tlp_plp_table(truth.astype(np.int32), first, second),
        tlp_plp_table_reference(truth, first, second),
    )


def test_counts_of_empty_input_are_zero():
    empty = np.array([], np.int64)
    np.testing.assert_array_equal(kernels.class_counts(empty, 4), np.zeros(4, np.int64))
    np.testing.assert_array_equal(
        kernels.confusion_matrix(empty, empty, 3), np.zeros((3, 3), np.int64)
    )
    np.testing.assert_array_equal(
        kernels.tlp_plp_table(empty, empty, empty), np.zeros((2, 2), np.int64)
    )


def test_tlp_plp_table_known_values():
    y_true = [0, 1, 2, 3, 4, 5]
    n1_pred = [0, 1, 2, 0, 0, 0]
    n2_pred = [0, 1, 0, 0, 1, 2]
    # TLP=1 on examples 0-2, PLP=1 on examples 0, 1 and 3.
    expected = np.array([[2, 1], [1, 2]])
    np.testing.assert_array_equal(kernels.tlp_plp_table(y_true, n1_pred, n2_pred), expected)


def test_confusion_matrix_rows_are_true_classes():
    result = kernels.confusion_matrix([0, 0, 1], [1, 1, 1], 2)
    np.testing.assert_array_equal(result, [[0, 2], [0, 1]])


def test_distinct_prediction_counts_edge_shapes():
    no_rows = kernels.distinct_prediction_counts(np.zeros((0, 5), np.int64))
    assert no_rows.shape == (0,)
    assert no_rows.dtype == np.int64
    np.testing.assert_array_equal(
        kernels.distinct_prediction_counts(np.zeros((4, 0), np.int64)), np.zeros(4)
    )
    np.testing.assert_array_equal(
        kernels.distinct_prediction_counts(np.array([[3, 1, 4]])), [3]
    )
    predictions = np.array([[0, 0, 0, 1], [0, 1, 0, 2], [0, 2, 1, 1]])
    # Columns have 1, 3, 2 and 2 distinct labels.
    np.testing.assert_array_equal(kernels.distinct_prediction_counts(predictions), [1, 2, 1])


@pytest.mark.parametrize("max_label", [62, 63, 64, 65])
def test_distinct_prediction_counts_around_mask_limit(max_label):
    # Labels below 64 take the bit-mask path, larger ones the comparison path.
    labels = np.random.default_rng(10).integers(max_label - 3, max_label + 1, (6, 1000))
    labels[0, 0] = max_label
    np.testing.assert_array_equal(
        kernels.distinct_prediction_counts(labels), distinct_prediction_counts_reference(labels)
    )


def test_uint64_labels_near_int64_max_accepted():
    labels = np.array([[2**63 - 1, 0], [2**63 - 1, 1]], np.uint64)
    np.testing.assert_array_equal(kernels.pairwise_agreement(labels), [[1.0, 0.5], [0.5, 1.0]])


# Input validation ------------------------------------------------------------

VALID_VECTOR = np.array([0, 1, 2])
VALID_MATRIX = np.array([[0, 1, 2], [2, 1, 0]])


def call_with(name, argument):
    """Call the public function `name` with `argument` in its first array slot."""
    calls = {
        "pairwise_agreement": lambda: kernels.pairwise_agreement(argument),
        "distinct_prediction_counts": lambda: kernels.distinct_prediction_counts(argument),
        "agreement": lambda: kernels.agreement(argument, VALID_VECTOR),
        "class_counts": lambda: kernels.class_counts(argument, 3),
        "confusion_matrix": lambda: kernels.confusion_matrix(argument, VALID_VECTOR, 3),
        "tlp_plp_table": lambda: kernels.tlp_plp_table(argument, VALID_VECTOR, VALID_VECTOR),
    }
    return calls[name]()


MATRIX_FUNCTIONS = ["pairwise_agreement", "distinct_prediction_counts"]
VECTOR_FUNCTIONS = ["agreement", "class_counts", "confusion_matrix", "tlp_plp_table"]
FIRST_ARGUMENT = {
    "pairwise_agreement": "predictions",
    "distinct_prediction_counts": "predictions",
    "agreement": "a",
    "class_counts": "predictions",
    "confusion_matrix": "y_true",
    "tlp_plp_table": "y_true",
}


@pytest.mark.parametrize("name", MATRIX_FUNCTIONS + VECTOR_FUNCTIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.bool_, np.complex64, object])
def test_non_integer_dtype_rejected(name, dtype):
    shape = (2, 3) if name in MATRIX_FUNCTIONS else (3,)
    argument = np.zeros(shape, dtype)
    with pytest.raises(ValueError, match=f"{FIRST_ARGUMENT[name]} must contain integer"):
        call_with(name, argument)


@pytest.mark.parametrize("name", MATRIX_FUNCTIONS)
@pytest.mark.parametrize("shape", [(), (3,), (2, 2, 2)])
def test_matrix_functions_reject_other_ndim(name, shape):
    expected = re.escape(f"predictions must be a 2-D array, got shape {shape}")
    with pytest.raises(ValueError, match=expected):
        call_with(name, np.zeros(shape, np.int64))


@pytest.mark.parametrize("name", VECTOR_FUNCTIONS)
@pytest.mark.parametrize("shape", [(), (3, 1)])
def test_vector_functions_reject_other_ndim(name, shape):
    with pytest.raises(ValueError, match=f"{FIRST_ARGUMENT[name]} must be a 1-D array"):
        call_with(name, np.zeros(shape, np.int64))


@pytest.mark.parametrize("name", MATRIX_FUNCTIONS + VECTOR_FUNCTIONS)
@pytest.mark.parametrize("dtype", [np.int8, np.int64])
def test_negative_label_rejected(name, dtype):
    argument = (VALID_MATRIX if name in MATRIX_FUNCTIONS else VALID_VECTOR).astype(dtype)
    argument[..., 1] = -7
    with pytest.raises(ValueError, match=f"{FIRST_ARGUMENT[name]} contains negative label -7"):
        call_with(name, argument)


def test_negative_label_in_second_arguments_rejected():
    bad = np.array([0, -1, 2])
    with pytest.raises(ValueError, match="b contains negative label -1"):
        kernels.agreement(VALID_VECTOR, bad)
    with pytest.raises(ValueError, match="y_pred contains negative label -1"):
        kernels.confusion_matrix(VALID_VECTOR, bad, 3)
    with pytest.raises(ValueError, match="n1_pred contains negative label -1"):
        kernels.tlp_plp_table(VALID_VECTOR, bad, VALID_VECTOR)
    with pytest.raises(ValueError, match="n2_pred contains negative label -1"):
        kernels.tlp_plp_table(VALID_VECTOR, VALID_VECTOR, bad)


def test_label_outside_num_classes_rejected():
    with pytest.raises(ValueError, match=r"predictions contains label 3, outside \[0, 3\)"):
        kernels.class_counts([0, 3, 1], 3)
    with pytest.raises(ValueError, match=r"y_true contains label 9, outside \[0, 3\)"):
        kernels.confusion_matrix([0, 9, 1], VALID_VECTOR, 3)
    with pytest.raises(ValueError, match=r"y_pred contains label 4, outside \[0, 3\)"):
        kernels.confusion_matrix(VALID_VECTOR, [0, 4, 1], 3)


def test_uint64_label_above_int64_rejected():
    labels = np.array([[0, 2**63], [1, 2]], np.uint64)
    with pytest.raises(ValueError, match=f"predictions contains label {2**63}"):
        kernels.pairwise_agreement(labels)


def test_length_mismatch_rejected():
    short = np.array([0, 1])
    with pytest.raises(ValueError, match="a has length 3 but b has length 2"):
        kernels.agreement(VALID_VECTOR, short)
    with pytest.raises(ValueError, match="y_true has length 3 but y_pred has length 2"):
        kernels.confusion_matrix(VALID_VECTOR, short, 3)
    with pytest.raises(ValueError, match="y_true has length 3 but n1_pred has length 2"):
        kernels.tlp_plp_table(VALID_VECTOR, short, VALID_VECTOR)
    with pytest.raises(ValueError, match="y_true has length 3 but n2_pred has length 2"):
        kernels.tlp_plp_table(VALID_VECTOR, VALID_VECTOR, short)


@pytest.mark.parametrize("num_classes", [0, -2, 2.5, True, "10", None])
def test_invalid_num_classes_rejected(num_classes):
    expected = re.escape(f"num_classes must be a positive integer, got {num_classes!r}")
    with pytest.raises(ValueError, match=expected):
        kernels.class_counts(VALID_VECTOR, num_classes)
    with pytest.raises(ValueError, match=expected):
        kernels.confusion_matrix(VALID_VECTOR, VALID_VECTOR, num_classes)


def test_numpy_integer_num_classes_accepted():
    np.testing.assert_array_equal(kernels.class_counts(VALID_VECTOR, np.int8(4)), [1, 1, 1, 0])


# Compilation and caching -----------------------------------------------------


def call_every_kernel(dtype, layout):
    """Call every public function, and every parallel core, on tiny inputs."""
    matrix = with_layout(VALID_MATRIX.astype(dtype), layout)
    vector = with_layout(VALID_VECTOR.astype(dtype), layout)
    kernels.pairwise_agreement(matrix)
    kernels.distinct_prediction_counts(matrix)
    kernels.agreement(vector, vector)
    kernels.class_counts(vector, 3)
    kernels.confusion_matrix(vector, vector, 3)
    kernels.tlp_plp_table(vector, vector, vector)
    # Inputs this small take the serial paths, so the parallel cores are called
    # directly, as the public functions do for large inputs.
    labels = VALID_VECTOR.astype(np.int64)
    _counts._class_counts_parallel(labels, 3, 2)
    _counts._confusion_counts_parallel(labels, labels, 3, 2)
    _distinct._distinct_counts_parallel(VALID_MATRIX.astype(np.int64), True, 2)
    bits, _, _ = _agreement._pack_bit_planes_parallel(VALID_MATRIX.astype(np.int64), 4)
    _agreement._pairwise_mismatches_parallel(bits.reshape(2, 1, 4, 1), 2)


def test_each_core_compiled_for_one_type():
    for dtype in DTYPES:
        for layout in LAYOUTS:
            call_every_kernel(dtype, layout)
    for core in ENTRY_KERNELS:
        assert len(core.signatures) == 1, f"{core.__name__}: {core.signatures}"


def test_threading_layer_pinned():
    expected = os.environ.get("NUMBA_THREADING_LAYER", "workqueue")
    assert numba.config.THREADING_LAYER == expected


FRESH_PROCESS_SCRIPT = """
import json
import numba
import numpy as np
import kernels
from kernels import _agreement, _counts, _distinct, _inputs

vector = np.array([0, 1, 2], np.int8)[::-1]
matrix = np.array([[0, 1, 2], [2, 1, 0]], np.uint16)
kernels.pairwise_agreement(matrix)
kernels.distinct_prediction_counts(matrix)
kernels.agreement(vector, vector)
kernels.class_counts(vector, 3)
kernels.confusion_matrix(vector, vector, 3)
kernels.tlp_plp_table(vector, vector, vector)
labels = np.array([0, 1, 2])
_counts._class_counts_parallel(labels, 3, 2)
_counts._confusion_counts_parallel(labels, labels, 3, 2)
_distinct._distinct_counts_parallel(np.array([[0, 1, 2], [2, 1, 0]]), True, 2)
bits, _, _ = _agreement._pack_bit_planes_parallel(np.array([[0, 1, 2], [2, 1, 0]]), 4)
_agreement._pairwise_mismatches_parallel(bits.reshape(2, 1, 4, 1), 2)

report = {}
for module in (_agreement, _counts, _distinct, _inputs):
    for name, value in vars(module).items():
        if isinstance(value, numba.core.dispatcher.Dispatcher) and value.signatures:
            report[name] = {
                "hits": sum(value.stats.cache_hits.values()),
                "misses": sum(value.stats.cache_misses.values()),
            }
print(json.dumps(report))
"""


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="needs numba compilation")
def test_fresh_process_loads_kernels_from_cache():
    # This process compiles (or loads) every core and so fills the on-disk cache.
    call_every_kernel(np.int64, "contiguous")
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")])
    )
    completed = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO_ROOT,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    names = {core.__name__ for core in ENTRY_KERNELS}
    assert names <= report.keys(), f"cores not called: {names - report.keys()}"
    for name, stats in report.items():
        assert stats["misses"] == 0, f"{name} was compiled instead of loaded: {stats}"
        assert stats["hits"] >= 1, f"{name} was not loaded from the cache: {stats}"
