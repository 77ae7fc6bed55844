"""Splits per seed, class-balanced subsets and the three data regimes on real CIFAR-10."""

import numpy as np
import pytest
import torch

from engine.data import load_dataset, make_split, n1_training_set, to_float
from engine.errors import UsageError


@pytest.fixture(scope="module")
def cifar(data_dir):
    return load_dataset("cifar10", data_dir)


def test_full_split_halves_are_disjoint(cifar):
    split = make_split(cifar, seed=0)
    assert len(split.d1) == len(split.d2) == 25000
    assert len(np.intersect1d(split.d1, split.d2)) == 0
    assert len(split.d3) == 10000


def test_split_depends_on_seed_only(cifar):
    a, b, c = make_split(cifar, 0), make_split(cifar, 0), make_split(cifar, 1)
    np.testing.assert_array_equal(a.d1, b.d1)
    assert not np.array_equal(a.d1, c.d1)


def test_subset_is_class_balanced(cifar):
    split = make_split(cifar, seed=3, subset=200)
    for part, labels in ((split.d1, cifar.train_labels), (split.d2, cifar.train_labels), (split.d3, cifar.test_labels)):
        assert np.bincount(labels.numpy()[part], minlength=10).tolist() == [20] * 10
    assert len(np.intersect1d(split.d1, split.d2)) == 0


def test_subset_remainder_spread(cifar):
    split = make_split(cifar, seed=0, subset=105)
    counts = np.bincount(cifar.train_labels.numpy()[split.d1], minlength=10)
    assert counts.sum() == 105
    assert sorted(counts.tolist()) == [10] * 5 + [11] * 5


def test_subset_too_large_rejected(cifar):
    with pytest.raises(UsageError, match="--subset 30000 exceeds"):
        make_split(cifar, 0, subset=30000)


def test_true_data_regime_keeps_labels(cifar):
    split = make_split(cifar, 0, subset=100)
    images, labels = n1_training_set(cifar, split, "true_data")
    assert torch.equal(labels, cifar.train_labels[torch.from_numpy(split.d1)])
    assert torch.equal(images, cifar.train_images[torch.from_numpy(split.d1)])


def test_random_labels_regime(cifar):
    split = make_split(cifar, 0, subset=1000)
    images, labels = n1_training_set(cifar, split, "random_labels")
    true = cifar.train_labels[torch.from_numpy(split.d1)]
    assert torch.equal(images, cifar.train_images[torch.from_numpy(split.d1)])
    # Uniform labels agree with the true ones on about 10% of images.
    assert 0.05 < (labels == true).float().mean().item() < 0.15
    assert set(labels.tolist()) == set(range(10))
    again = n1_training_set(cifar, split, "random_labels")[1]
    assert torch.equal(labels, again)


def test_random_images_regime_fills_range(cifar):
    split = make_split(cifar, 0, subset=100)
    images, labels = n1_training_set(cifar, split, "random_images")
    x = to_float(images)
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert abs(x.mean().item()) < 0.01
    assert abs(x.std().item() - (1 / 3) ** 0.5) < 0.01  # std of U(-1, 1)
    assert labels.max().item() <= 9


def test_pixels_scaled_to_unit_range(cifar):
    x = to_float(cifar.train_images[:100])
    assert x.min().item() >= -1.0 and x.max().item() <= 1.0
    assert to_float(torch.tensor([0, 255], dtype=torch.uint8)).tolist() == [-1.0, 1.0]


def test_unknown_regime_rejected(cifar):
    split = make_split(cifar, 0, subset=100)
    with pytest.raises(UsageError, match="unknown regime 'noise'; choose from true_data"):
        n1_training_set(cifar, split, "noise")


def test_d3_subset_same_for_every_seed(cifar):
    a, b = make_split(cifar, 0, subset=100), make_split(cifar, 4, subset=100)
    np.testing.assert_array_equal(a.d3, b.d3)
    assert not np.array_equal(a.d1, b.d1)
