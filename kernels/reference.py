"""Plain NumPy versions of the kernels, used as test oracles and benchmark baselines.

They share no code with the numba kernels, skip input validation, and return the
same values for valid input.
"""

import numpy as np
import numpy.typing as npt


def agreement_reference(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Return the fraction of positions where a and b are equal, nan if empty."""
    first = np.asarray(a)
    second = np.asarray(b)
    if first.size == 0:
        return float("nan")
    return float(np.count_nonzero(first == second) / first.size)


def pairwise_agreement_reference(predictions: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Return the [k, k] agreement matrix by broadcasting rows against each other.

    This builds a boolean array of k * k * n bytes.
    """
    labels = np.asarray(predictions)
    rows, examples = labels.shape
    if examples == 0:
        return np.full((rows, rows), np.nan)
    matches = labels[:, None, :] == labels[None, :, :]
    return matches.sum(axis=-1) / examples


def confusion_matrix_reference(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, num_classes: int
) -> npt.NDArray[np.int64]:
    """Return the [c, c] confusion matrix (rows are true classes) via np.bincount."""
    truth = np.asarray(y_true).astype(np.int64)
    predicted = np.asarray(y_pred).astype(np.int64)
    flat = np.bincount(truth * num_classes + predicted, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def class_counts_reference(
    predictions: npt.ArrayLike, num_classes: int
) -> npt.NDArray[np.int64]:
    """Return the number of labels per class via np.bincount."""
    labels = np.asarray(predictions).astype(np.int64)
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


def tlp_plp_table_reference(
    y_true: npt.ArrayLike, n1_pred: npt.ArrayLike, n2_pred: npt.ArrayLike
) -> npt.NDArray[np.int64]:
    """Return the [2, 2] table of TLP = [N1 = y] (rows) by PLP = [N1 = N2] (columns)."""
    truth = np.asarray(y_true)
    first = np.asarray(n1_pred)
    second = np.asarray(n2_pred)
    tlp = (first == truth).astype(np.int64)
    plp = (first == second).astype(np.int64)
    return np.bincount(2 * tlp + plp, minlength=4).reshape(2, 2).astype(np.int64)


def distinct_prediction_counts_reference(
    predictions: npt.ArrayLike,
) -> npt.NDArray[np.int64]:
    """Return how many examples get 1, 2, ..., k distinct labels from the k rows.

    Sorting each column makes equal labels adjacent, so the distinct count of a
    column is 1 plus the number of changes between neighbours.
    """
    labels = np.asarray(predictions)
    rows, examples = labels.shape
    if rows == 0 or examples == 0:
        return np.zeros(rows, np.int64)
    ordered = np.sort(labels, axis=0)
    distinct = 1 + np.count_nonzero(np.diff(ordered, axis=0), axis=0)
    return np.bincount(distinct - 1, minlength=rows).astype(np.int64)
