"""Agreement between prediction vectors: one pair, or all pairs of k rows.

`pairwise_agreement` packs each row into bit planes: bit b of every label goes into
plane b, 64 examples per uint64 word. Two rows differ on an example exactly when
some plane differs there, so the mismatch count of a pair is the popcount of the
bitwise OR over planes of (row_i XOR row_j). With 10 classes that is 4 planes, and
one 64-bit word covers 64 examples in 4 XOR, 3 OR and 1 popcount.
"""

import math

import numpy as np
import numpy.typing as npt
from numba import njit, prange

from kernels._inputs import as_labels, check_non_negative, check_same_length
from kernels._popcount import popcount

# Planes are handled in groups of 4 so that the common case (at most 16 classes,
# one group) runs a loop with a fixed number of planes, which LLVM vectorizes.
_PLANES_PER_GROUP = 4

# Work sizes from which the parallel kernels are used: labels to pack, and row
# pairs times plane groups times 64-example words to compare. Below them the
# serial kernels are faster, because starting a parallel region costs 10 to 150
# microseconds (more on a busy machine). Measured serial costs on one AMD EPYC
# core: packing about 0.6 ns per label, comparing about 0.3 ns per pair-word, so
# each threshold is about 0.6 ms of serial work.
_PARALLEL_MIN_LABELS = 1 << 20
_PARALLEL_MIN_PAIR_WORDS = 1 << 21


def agreement(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Compute the fraction of positions at which two label vectors are equal.

    Args:
        a: Integer class labels, shape [n].
        b: Integer class labels, shape [n].

    Returns:
        The number of positions i with a[i] == b[i], divided by n. For n = 0 the
        fraction is undefined and the result is nan.

    Raises:
        ValueError: If an input is not a 1-D integer array, the lengths differ, or a
            label is negative.
    """
    first = as_labels(a, "a", ndim=1)
    second = as_labels(b, "b", ndim=1)
    check_same_length("a", first, "b", second)
    if first.shape[0] == 0:
        return math.nan
    # The count is safe to compute on any labels, so the same pass also returns
    # the smallest label of each input for the range check.
    equal, first_low, second_low = _count_equal(first, second)
    check_non_negative(int(first_low), "a")
    check_non_negative(int(second_low), "b")
    return equal / first.shape[0]


def pairwise_agreement(predictions: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Compute the agreement of every pair of rows of a [k, n] label matrix.

    Args:
        predictions: Integer class labels, shape [k, n]: row i contains
            the predictions of model i on the same n examples.

    Returns:
        A float64 array of shape [k, k] whose entry (i, j) is the fraction of the n
        examples on which rows i and j predict the same class. The matrix is
        symmetric with 1.0 on the diagonal. For n = 0 every entry, the diagonal
        included, is nan. For k = 0 the result has shape [0, 0].

    Raises:
        ValueError: If `predictions` is not a 2-D integer array or contains a
            negative label.
    """
    labels = as_labels(predictions, "predictions", ndim=2)
    rows, examples = labels.shape
    if rows == 0 or examples == 0:
        return np.full((rows, rows), np.nan)

    # Packing checks the label range in the same pass over the input. It assumes
    # one plane group (labels below 16) and packs again when the labels need more.
    if labels.size >= _PARALLEL_MIN_LABELS:
        pack = _pack_bit_planes_parallel
    else:
        pack = _pack_bit_planes
    bits, low, high = pack(labels, _PLANES_PER_GROUP)
    check_non_negative(int(low), "predictions")
    groups = -(-max(1, int(high).bit_length()) // _PLANES_PER_GROUP)
    if groups > 1:
        bits, _, _ = pack(labels, groups * _PLANES_PER_GROUP)
    words = bits.shape[2]
    bits = bits.reshape(bits.shape[0], groups, _PLANES_PER_GROUP, words)

    pair_words = rows * (rows + 1) // 2 * groups * words
    if pair_words >= _PARALLEL_MIN_PAIR_WORDS:
        mismatches = _pairwise_mismatches_parallel(bits, rows)
    else:
        mismatches = _pairwise_mismatches(bits, rows)
    return (examples - mismatches) / examples


@njit(cache=True, nogil=True)
def _count_equal(first, second):
    """Return the number of equal positions and the smallest label of each vector."""
    equal = 0
    first_low = first[0]
    second_low = second[0]
    for index in range(first.shape[0]):
        equal += np.int64(first[index] == second[index])
        first_low = min(first_low, first[index])
        second_low = min(second_low, second[index])
    return equal, first_low, second_low


@njit(cache=True, nogil=True, inline="always")
def _pack_group(labels, row, start, count, shift):
    """Return the words of planes shift to shift + 3 for `count` labels of a row.

    Bit i of the word of plane shift + p is bit shift + p of labels[row, start + i].

    Extracting 4 planes per pass over the labels made packing about 1.2 times faster
    than one plane per pass (k = 256, n = 10,000, range scan included).
    """
    plane0 = np.uint64(0)
    plane1 = np.uint64(0)
    plane2 = np.uint64(0)
    plane3 = np.uint64(0)
    for offset in range(count):
        value = np.uint64(labels[row, start + offset] >> shift)
        position = np.uint64(offset)
        plane0 |= (value & np.uint64(1)) << position
        plane1 |= ((value >> np.uint64(1)) & np.uint64(1)) << position
        plane2 |= ((value >> np.uint64(2)) & np.uint64(1)) << position
        plane3 |= ((value >> np.uint64(3)) & np.uint64(1)) << position
    return plane0, plane1, plane2, plane3


@njit(cache=True, nogil=True)
def _pack_row(labels, row, bits, lows, highs):
    """Write the bit planes of labels[row] into bits[row] and its range into lows, highs."""
    examples = labels.shape[1]
    groups = bits.shape[1] // _PLANES_PER_GROUP
    low = labels[row, 0]
    high = labels[row, 0]
    for word in range(bits.shape[2]):
        start = word * 64
        count = min(64, examples - start)
        # The range scan reads the word's labels into L1 cache for the packing loops.
        for offset in range(count):
            low = min(low, labels[row, start + offset])
            high = max(high, labels[row, start + offset])
        for group in range(groups):
            # A literal count of 64 lets LLVM vectorize the inlined loop without a
            # remainder loop. Bits above `count` in a last, partial word stay zero,
            # so they never count as mismatches.
            if count == 64:
                planes = _pack_group(labels, row, start, 64, 4 * group)
            else:
                planes = _pack_group(labels, row, start, count, 4 * group)
            for plane in range(_PLANES_PER_GROUP):
                bits[row, 4 * group + plane, word] = planes[plane]
    lows[row] = low
    highs[row] = high


@njit(cache=True, nogil=True)
def _empty_bit_planes(rows, examples, planes):
    """Allocate bit planes [k_even, planes, words] with a zero padding row if k is odd.

    k_even is k rounded up to an even number because the pair kernels work on 2x2
    tiles of rows. Results for the padding row are discarded.
    """
    words = (examples + 63) // 64
    bits = np.empty((rows + rows % 2, planes, words), np.uint64)
    bits[rows:] = 0
    return bits


@njit(cache=True, nogil=True)
def _pack_bit_planes(labels, planes):
    """Pack the low `planes` bits of [k, n] labels into uint64 bit planes.

    `planes` must be a multiple of 4.

    Returns:
        The planes as [k_even, planes, words] (see `_empty_bit_planes`), and the
        smallest and largest label.
    """
    rows, examples = labels.shape
    bits = _empty_bit_planes(rows, examples, planes)
    lows = np.empty(rows, np.int64)
    highs = np.empty(rows, np.int64)
    for row in range(rows):
        _pack_row(labels, row, bits, lows, highs)
    return bits, lows.min(), highs.max()


@njit(cache=True, nogil=True, parallel=True)
def _pack_bit_planes_parallel(labels, planes):
    """Pack bit planes as `_pack_bit_planes` does, one row per parallel iteration."""
    rows, examples = labels.shape
    bits = _empty_bit_planes(rows, examples, planes)
    lows = np.empty(rows, np.int64)
    highs = np.empty(rows, np.int64)
    for row in prange(rows):
        _pack_row(labels, row, bits, lows, highs)
    return bits, lows.min(), highs.max()


@njit(cache=True, nogil=True, inline="always")
def _group_difference(bits, row, other, group, word):
    """Return a word with a bit set where rows `row` and `other` differ in a plane group."""
    return (
        (bits[row, group, 0, word] ^ bits[other, group, 0, word])
        | (bits[row, group, 1, word] ^ bits[other, group, 1, word])
        | (bits[row, group, 2, word] ^ bits[other, group, 2, word])
        | (bits[row, group, 3, word] ^ bits[other, group, 3, word])
    )


@njit(cache=True, nogil=True)
def _tile_mismatches_one_group(bits, row, column):
    """Count mismatches of rows (row, row + 1) against (column, column + 1), one plane group.

    Computing a 2x2 tile per pass loads each word once for two pairs. This measured
    about 2 times faster than one pair per pass at k = 256, n = 10,000.
    """
    top_left = 0
    top_right = 0
    bottom_left = 0
    bottom_right = 0
    for word in range(bits.shape[3]):
        top_left += popcount(_group_difference(bits, row, column, 0, word))
        top_right += popcount(_group_difference(bits, row, column + 1, 0, word))
        bottom_left += popcount(_group_difference(bits, row + 1, column, 0, word))
        bottom_right += popcount(_group_difference(bits, row + 1, column + 1, 0, word))
    return top_left, top_right, bottom_left, bottom_right


@njit(cache=True, nogil=True)
def _tile_mismatches_many_groups(bits, row, column, scratch):
    """Count mismatches of a 2x2 tile of rows when labels need more than one plane group.

    The difference words of all groups are ORed into `scratch` ([4, words]) first,
    so that every loop keeps a fixed number of planes and stays vectorized.
    """
    groups = bits.shape[1]
    words = bits.shape[3]
    for word in range(words):
        scratch[0, word] = _group_difference(bits, row, column, 0, word)
        scratch[1, word] = _group_difference(bits, row, column + 1, 0, word)
        scratch[2, word] = _group_difference(bits, row + 1, column, 0, word)
        scratch[3, word] = _group_difference(bits, row + 1, column + 1, 0, word)
    for group in range(1, groups):
        for word in range(words):
            scratch[0, word] |= _group_difference(bits, row, column, group, word)
            scratch[1, word] |= _group_difference(bits, row, column + 1, group, word)
            scratch[2, word] |= _group_difference(bits, row + 1, column, group, word)
            scratch[3, word] |= _group_difference(bits, row + 1, column + 1, group, word)

    top_left = 0
    top_right = 0
    bottom_left = 0
    bottom_right = 0
    for word in range(words):
        top_left += popcount(scratch[0, word])
        top_right += popcount(scratch[1, word])
        bottom_left += popcount(scratch[2, word])
        bottom_right += popcount(scratch[3, word])
    return top_left, top_right, bottom_left, bottom_right


@njit(cache=True, nogil=True)
def _fill_row_pair(bits, row_pair, mismatches, scratch):
    """Fill mismatches of rows 2 * row_pair and 2 * row_pair + 1 with themselves and later rows."""
    rows = mismatches.shape[0]
    row = 2 * row_pair
    for column in range(row, bits.shape[0], 2):
        if bits.shape[1] == 1:
            tile = _tile_mismatches_one_group(bits, row, column)
        else:
            tile = _tile_mismatches_many_groups(bits, row, column, scratch)
        for down in range(2):
            for right in range(2):
                first = row + down
                second = column + right
                # Skips the zero padding row that makes an odd k even.
                if first < rows and second < rows:
                    mismatches[first, second] = tile[2 * down + right]
                    mismatches[second, first] = tile[2 * down + right]


@njit(cache=True, nogil=True)
def _pairwise_mismatches(bits, rows):
    """Count, for every pair of the first `rows` rows, the examples where they differ.

    Args:
        bits: Bit planes [k_even, groups, 4, words] from `_pack_bit_planes`.
        rows: The number k of real rows.

    Returns:
        A symmetric int64 array [k, k] with zeros on the diagonal.
    """
    mismatches = np.empty((rows, rows), np.int64)
    scratch = np.empty((4, bits.shape[3]), np.uint64)
    for row_pair in range(bits.shape[0] // 2):
        _fill_row_pair(bits, row_pair, mismatches, scratch)
    return mismatches


@njit(cache=True, nogil=True, parallel=True)
def _pairwise_mismatches_parallel(bits, rows):
    """Count mismatches as `_pairwise_mismatches` does, spread over threads."""
    row_pairs = bits.shape[0] // 2
    mismatches = np.empty((rows, rows), np.int64)
    # Row pair t has row_pairs - t tiles to compute. Giving each parallel iteration
    # row pairs t and row_pairs - 1 - t balances the work across threads.
    for task in prange((row_pairs + 1) // 2):
        scratch = np.empty((4, bits.shape[3]), np.uint64)
        _fill_row_pair(bits, task, mismatches, scratch)
        if row_pairs - 1 - task != task:
            _fill_row_pair(bits, row_pairs - 1 - task, mismatches, scratch)
    return mismatches
