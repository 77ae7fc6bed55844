"""Count statistics of label vectors: class counts, confusion matrix, TLP/PLP table."""

import numba
import numpy as np
import numpy.typing as npt
from numba import njit, prange

from kernels._inputs import (
    as_labels,
    check_label_range,
    check_non_negative,
    check_num_classes,
    check_same_length,
)

# Each parallel chunk fills a private histogram. Requiring at least this many
# examples per chunk, and at least as many as histogram bins, keeps small inputs on
# one thread and bounds the extra memory by the size of the input. A chunk of 2^18
# examples takes about 0.4 ms serially (AMD EPYC), several times the cost of
# starting a parallel region.
_MIN_EXAMPLES_PER_CHUNK = 1 << 18


def class_counts(predictions: npt.ArrayLike, num_classes: int) -> npt.NDArray[np.int64]:
    """Count how often each class occurs in a label vector.

    Args:
        predictions: Integer class labels, shape [n].
        num_classes: The number of classes c. Labels must lie in [0, c).

    Returns:
        An int64 array of shape [c] whose entry i is the number of labels equal to i.
        All zeros for n = 0.

    Raises:
        ValueError: If `predictions` is not a 1-D integer array, `num_classes` is not
            a positive integer, or a label lies outside [0, num_classes).
    """
    classes = check_num_classes(num_classes)
    labels = as_labels(predictions, "predictions", ndim=1)
    check_label_range(labels, "predictions", classes)
    chunks = _histogram_chunks(labels.shape[0], classes)
    if chunks == 1:
        counts = np.zeros(classes, np.int64)
        _add_class_counts(labels, counts)
        return counts
    return _class_counts_parallel(labels, classes, chunks)


def confusion_matrix(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, num_classes: int
) -> npt.NDArray[np.int64]:
    """Count examples by (true class, predicted class).

    Args:
        y_true: True class labels, shape [n].
        y_pred: Predicted class labels, shape [n].
        num_classes: The number of classes c. Labels must lie in [0, c).

    Returns:
        An int64 array of shape [c, c] whose entry (t, p) is the number of examples
        with true class t and predicted class p. Rows are true classes. All zeros
        for n = 0.

    Raises:
        ValueError: If an input is not a 1-D integer array, the lengths differ,
            `num_classes` is not a positive integer, or a label lies outside
            [0, num_classes).
    """
    classes = check_num_classes(num_classes)
    truth = as_labels(y_true, "y_true", ndim=1)
    predicted = as_labels(y_pred, "y_pred", ndim=1)
    check_same_length("y_true", truth, "y_pred", predicted)
    check_label_range(truth, "y_true", classes)
    check_label_range(predicted, "y_pred", classes)
    chunks = _histogram_chunks(truth.shape[0], classes * classes)
    if chunks == 1:
        counts = np.zeros(classes * classes, np.int64)
        _add_pair_counts(truth, predicted, classes, counts)
        return counts.reshape(classes, classes)
    return _confusion_counts_parallel(truth, predicted, classes, chunks)


def tlp_plp_table(
    y_true: npt.ArrayLike, n1_pred: npt.ArrayLike, n2_pred: npt.ArrayLike
) -> npt.NDArray[np.int64]:
    """Cross-tabulate whether N1 is correct (TLP) by whether N2 copies N1 (PLP).

    TLP(x) = [N1(x) = y(x)] and PLP(x) = [N1(x) = N2(x)], each in {0, 1}.

    Args:
        y_true: True class labels y, shape [n].
        n1_pred: Predictions of network N1, shape [n].
        n2_pred: Predictions of network N2, shape [n].

    Returns:
        An int64 array of shape [2, 2] whose entry (t, p) is the number of examples
        with TLP = t and PLP = p. All zeros for n = 0.

    Raises:
        ValueError: If an input is not a 1-D integer array, the lengths differ, or a
            label is negative.
    """
    truth = as_labels(y_true, "y_true", ndim=1)
    first = as_labels(n1_pred, "n1_pred", ndim=1)
    second = as_labels(n2_pred, "n2_pred", ndim=1)
    check_same_length("y_true", truth, "n1_pred", first)
    check_same_length("y_true", truth, "n2_pred", second)
    examples = truth.shape[0]
    if examples == 0:
        return np.zeros((2, 2), np.int64)

    # The four cells follow from three sums, which vectorize better than a
    # histogram. The sums are safe to compute on any labels, so the same pass also
    # returns the smallest label of each input for the range check.
    tlp, plp, both, truth_low, first_low, second_low = _tlp_plp_sums(truth, first, second)
    check_non_negative(int(truth_low), "y_true")
    check_non_negative(int(first_low), "n1_pred")
    check_non_negative(int(second_low), "n2_pred")
    return np.array(
        [[examples - tlp - plp + both, plp - both], [tlp - both, both]], dtype=np.int64
    )


def _histogram_chunks(examples: int, bins: int) -> int:
    """Return the number of parallel chunks for a histogram of `bins` bins.

    A result of 1 means the caller runs the serial kernel, which avoids the cost of
    starting a parallel region (10 to 150 microseconds, more on a busy machine).
    """
    per_chunk = max(bins, _MIN_EXAMPLES_PER_CHUNK)
    return max(1, min(numba.get_num_threads(), examples // per_chunk))


@njit(cache=True, nogil=True)
def _add_class_counts(labels, counts):
    """Add the number of occurrences of each label to `counts`."""
    for index in range(labels.shape[0]):
        counts[labels[index]] += 1


@njit(cache=True, nogil=True, parallel=True)
def _class_counts_parallel(labels, num_classes, chunks):
    """Count labels per class, with one private histogram per chunk of examples."""
    examples = labels.shape[0]
    partial = np.zeros((chunks, num_classes), np.int64)
    for chunk in prange(chunks):
        start = chunk * examples // chunks
        stop = (chunk + 1) * examples // chunks
        _add_class_counts(labels[start:stop], partial[chunk])
    return partial.sum(axis=0)


@njit(cache=True, nogil=True)
def _add_pair_counts(truth, predicted, num_classes, counts):
    """Add the count of each (true, predicted) pair to the flat [c * c] `counts`."""
    for index in range(truth.shape[0]):
        counts[truth[index] * num_classes + predicted[index]] += 1


@njit(cache=True, nogil=True, parallel=True)
def _confusion_counts_parallel(truth, predicted, num_classes, chunks):
    """Count (true, predicted) pairs, with one private histogram per chunk of examples."""
    examples = truth.shape[0]
    partial = np.zeros((chunks, num_classes * num_classes), np.int64)
    for chunk in prange(chunks):
        start = chunk * examples // chunks
        stop = (chunk + 1) * examples // chunks
        _add_pair_counts(truth[start:stop], predicted[start:stop], num_classes, partial[chunk])
    return partial.sum(axis=0).reshape(num_classes, num_classes)


@njit(cache=True, nogil=True)
def _tlp_plp_sums(truth, first, second):
    """Return the counts of TLP = 1, of PLP = 1 and of both, then each input's minimum."""
    tlp = 0
    plp = 0
    both = 0
    truth_low = truth[0]
    first_low = first[0]
    second_low = second[0]
    for index in range(truth.shape[0]):
        correct = np.int64(first[index] == truth[index])
        copied = np.int64(first[index] == second[index])
        tlp += correct
        plp += copied
        both += correct & copied
        truth_low = min(truth_low, truth[index])
        first_low = min(first_low, first[index])
        second_low = min(second_low, second[index])
    return tlp, plp, both, truth_low, first_low, second_low
