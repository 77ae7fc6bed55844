"""D1/D2/D3 splits per seed and the three data regimes of N1's training set.

D1 and D2 are the two halves of the train set under a permutation drawn per seed;
D3 is the test set. With ``subset=N``, each of D1, D2 and D3 keeps a class-balanced
draw of N images (N // classes per class, the remainder spread over the first
classes of a seeded order). The draw from D3 is the same for every seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.data.datasets import Dataset
from engine.errors import UsageError
from engine.seeds import derive_seed

REGIMES = ("true_data", "random_labels", "random_images")


@dataclass(frozen=True)
class Split:
    """Indices of D1 and D2 into the train set, and of D3 into the test set (int64)."""

    seed: int
    d1: np.ndarray
    d2: np.ndarray
    d3: np.ndarray


def validate_regime(regime: str) -> None:
    """Raise ``UsageError`` naming the regime and the choices unless it is known."""
    if regime not in REGIMES:
        raise UsageError(f"unknown regime {regime!r}; choose from {', '.join(REGIMES)}")


def _balanced(indices: np.ndarray, labels: np.ndarray, n: int, classes: int, rng, where: str) -> np.ndarray:
    """Keep ``n`` of ``indices`` (already in random order), as equal a number per class as possible."""
    per_class = np.full(classes, n // classes)
    per_class[rng.permutation(classes)[: n % classes]] += 1
    chosen = []
    for c in range(classes):
        of_class = indices[labels[indices] == c]
        if len(of_class) < per_class[c]:
            raise UsageError(
                f"--subset {n} needs {per_class[c]} images of class {c} in {where}, "
                f"which has {len(of_class)}; lower --subset"
            )
        chosen.append(of_class[: per_class[c]])
    merged = np.concatenate(chosen)
    return merged[rng.permutation(len(merged))]


def make_split(dataset: Dataset, seed: int, subset: int | None = None) -> Split:
    """Draw D1, D2 (halves of the train set) and D3 (the test set) for one seed."""
    rng = np.random.default_rng(derive_seed(seed, "split"))
    n_train = len(dataset.train_labels)
    order = rng.permutation(n_train)
    half = n_train // 2
    d1, d2 = order[:half], order[half : 2 * half]
    d3 = np.arange(len(dataset.test_labels))
    if subset is not None:
        if subset < 1:
            raise UsageError(f"--subset {subset} must be positive")
        limit = min(half, len(d3))
        if subset > limit:
            raise UsageError(f"--subset {subset} exceeds the {limit} images a split has; lower it")
        train_y = dataset.train_labels.numpy()
        test_y = dataset.test_labels.numpy()
        classes = dataset.num_classes
        if subset < classes:
            raise UsageError(
                f"--subset {subset} is smaller than the {classes} classes of {dataset.name}; "
                f"give at least {classes}, a multiple of {classes} for equal classes"
            )
        d1 = _balanced(d1, train_y, subset, classes, rng, "D1")
        d2 = _balanced(d2, train_y, subset, classes, rng, "D2")
        # D3 is the test set itself in the protocol, the same for every seed. Its subset is
        # therefore drawn once, independently of the seed, so that networks of different
        # seeds are compared on the same images, as seed agreement needs.
        fixed = np.random.default_rng(derive_seed(0, "d3-subset"))
        d3 = np.sort(_balanced(fixed.permutation(d3), test_y, subset, classes, fixed, "D3"))
    return Split(seed=seed, d1=d1.astype(np.int64), d2=d2.astype(np.int64), d3=d3.astype(np.int64))


def n1_training_set(
    dataset: Dataset, split: Split, regime: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return N1's training images (uint8 ``[n, C, H, W]``) and labels (int64 ``[n]``).

    ``random_images`` draws every pixel uniformly from the 256 uint8 levels, which
    :func:`to_float` maps onto [-1, 1]: the same grid of values real pixels take.
    """
    validate_regime(regime)
    index = torch.from_numpy(split.d1)
    images = dataset.train_images[index]
    labels = dataset.train_labels[index]
    if regime == "true_data":
        return images, labels
    generator = torch.Generator().manual_seed(derive_seed(split.seed, "regime", regime))
    labels = torch.randint(dataset.num_classes, (len(index),), generator=generator)
    if regime == "random_images":
        images = torch.randint(0, 256, images.shape, generator=generator, dtype=torch.uint8)
    return images, labels


def to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scale uint8 pixels to [-1, 1]."""
    return images.to(dtype) / 127.5 - 1.0
