"""Datasets, splits and data regimes."""

from engine.data.datasets import DATA_DIR_ENV, DATASET_NAMES, Dataset, load_dataset, resolve_data_dir
from engine.data.splits import REGIMES, Split, make_split, n1_training_set, to_float, validate_regime

__all__ = [
    "DATA_DIR_ENV",
    "DATASET_NAMES",
    "Dataset",
    "REGIMES",
    "Split",
    "load_dataset",
    "make_split",
    "n1_training_set",
    "resolve_data_dir",
    "to_float",
    "validate_regime",
]
