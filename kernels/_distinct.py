"""Histogram of the number of distinct predictions that k models make per example."""

import numba
import numpy as np
import numpy.typing as npt
from numba import njit, prange

from kernels._inputs import as_labels, check_label_range
from kernels._popcount import popcount

# Examples are processed in blocks of this many so that the per-block scratch
# arrays stay in L1 cache and each loop runs over contiguous memory.
_BLOCK = 512

# Labels below this bound fit one bit each in a uint64 class mask.
_MASK_BITS = 64

# Examples per parallel chunk. A chunk of 2^18 examples with k = 5 takes about
# 0.6 ms serially (AMD EPYC), several times the cost of starting a parallel region.
_MIN_EXAMPLES_PER_CHUNK = 1 << 18


def distinct_prediction_counts(predictions: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Count examples by how many distinct classes k models predict for them.

    Args:
        predictions: Integer class labels, shape [k, n]: row i contains
            the predictions of model i on the same n examples.

    Returns:
        An int64 array of shape [k] whose entry i is the number of examples on which
        the k rows make exactly i + 1 distinct predictions. The entries sum to n
        when k >= 1. All zeros for n = 0, and shape [0] for k = 0.

    Raises:
        ValueError: If `predictions` is not a 2-D integer array or contains a
            negative label.
    """
    labels = as_labels(predictions, "predictions", ndim=2)
    rows, examples = labels.shape
    if rows == 0 or examples == 0:
        return np.zeros(rows, np.int64)
    small_labels = check_label_range(labels, "predictions") < _MASK_BITS

    chunks = max(1, min(numba.get_num_threads(), examples // _MIN_EXAMPLES_PER_CHUNK))
    if chunks == 1:
        counts = np.zeros(rows, np.int64)
        _add_distinct_counts(labels, 0, examples, small_labels, counts)
        return counts
    return _distinct_counts_parallel(labels, small_labels, chunks)


@njit(cache=True, nogil=True)
def _distinct_by_mask(labels, start, stop, masks, distinct):
    """Store in distinct[:stop - start] the number of distinct labels per column.

    Needs labels in [0, 64). Each column ORs one bit per label into a uint64 mask,
    and the popcount of the mask is the distinct count. This costs O(k) per example
    and measured 2 times faster than `_distinct_by_comparison` at k = 5.
    """
    width = stop - start
    column_masks = masks[:width]
    column_masks[:] = 0
    for row in range(labels.shape[0]):
        current = labels[row, start:stop]
        for offset in range(width):
            column_masks[offset] |= np.uint64(1) << np.uint64(current[offset])
    for offset in range(width):
        distinct[offset] = popcount(column_masks[offset])


@njit(cache=True, nogil=True)
def _distinct_by_comparison(labels, start, stop, is_new, distinct):
    """Store in distinct[:stop - start] the number of distinct labels per column.

    Works for any labels. A label in row r is new for its example when it differs
    from the labels of all rows above r. This costs O(k^2) comparisons per example.
    The loops run on 1-D row slices and int64 flags, which measured 3 times faster
    than 2-D indexing with bool flags (k = 5, n = 1,000,000).
    """
    width = stop - start
    counts = distinct[:width]
    flags = is_new[:width]
    counts[:] = 1
    for row in range(1, labels.shape[0]):
        current = labels[row, start:stop]
        flags[:] = 1
        for earlier in range(row):
            previous = labels[earlier, start:stop]
            for offset in range(width):
                flags[offset] &= np.int64(previous[offset] != current[offset])
        for offset in range(width):
            counts[offset] += flags[offset]


@njit(cache=True, nogil=True)
def _add_distinct_counts(labels, start, stop, small_labels, counts):
    """Add to counts[d - 1] the number of columns in [start, stop) with d distinct labels."""
    masks = np.empty(_BLOCK, np.uint64)
    is_new = np.empty(_BLOCK, np.int64)
    distinct = np.empty(_BLOCK, np.int64)
    for block_start in range(start, stop, _BLOCK):
        block_stop = min(block_start + _BLOCK, stop)
        width = block_stop - block_start
        if small_labels:
            _distinct_by_mask(labels, block_start, block_stop, masks, distinct)
        else:
            _distinct_by_comparison(labels, block_start, block_stop, is_new, distinct)
        # One vectorized pass per count value. Scattered increments into the k bins
        # measured about 10% slower at k = 5, because runs of equal counts make
        # each increment wait for the previous one.
        for value in range(counts.shape[0]):
            total = 0
            for offset in range(width):
                total += np.int64(distinct[offset] == value + 1)
            counts[value] += total


@njit(cache=True, nogil=True, parallel=True)
def _distinct_counts_parallel(labels, small_labels, chunks):
    """Histogram the distinct-label count per example, one chunk of examples per thread."""
    rows, examples = labels.shape
    partial = np.zeros((chunks, rows), np.int64)
    for chunk in prange(chunks):
        start = chunk * examples // chunks
        stop = (chunk + 1) * examples // chunks
        _add_distinct_counts(labels, start, stop, small_labels, partial[chunk])
    return partial.sum(axis=0)
