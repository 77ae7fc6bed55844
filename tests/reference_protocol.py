"""A plain PyTorch implementation of the learnability protocol on CIFAR-10.

It exists as an independent check of the engine and uses no engine code: one network at
a time, a stock DataLoader, torch.optim.SGD and nn.CrossEntropyLoss. Learnability of N1
is the percentage of D3 on which N2, trained on (D2, N1(D2)), predicts N1's class.
"""

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REGIMES = ("true_data", "random_labels", "random_images")
NUM_CLASSES = 10
BATCH_SIZE = 64
LEARNING_RATE = 0.01
PLATEAU_EPOCHS = 10
LR_DIVISOR = 4.0
TARGET_ERROR = 0.01


def load_batches(data_dir: str, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Load CIFAR-10 python batches as images [N, 3, 32, 32] uint8 and labels [N] int64."""
    images, labels = [], []
    for name in names:
        with open(Path(data_dir) / name, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def take_balanced(indices: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
    """Keep the first `per_class` indices of each class, in the order of `indices`."""
    keep = np.zeros(len(indices), dtype=bool)
    for c in range(NUM_CLASSES):
        positions = np.flatnonzero(labels[indices] == c)[:per_class]
        if len(positions) < per_class:
            raise ValueError(f"class {c} has {len(positions)} images, expected {per_class}. "
                             "Lower subset.")
        keep[positions] = True
    return indices[keep]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """Scale uint8 pixels to float32 in [-1, 1]."""
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)


def shallow_cnn(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(width * 16 * 16, NUM_CLASSES),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int,
          max_epochs: int) -> tuple[int, float]:
    """Train with plain SGD until the epoch error is below 1% or after `max_epochs`.

    Returns the number of epochs run and the training 0-1 error (a fraction) of the last
    epoch, counted on that epoch's forward passes before each update.
    """
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0,
                                weight_decay=0)
    loss_fn = nn.CrossEntropyLoss()
    best_error, epochs_without_improvement = float("inf"), 0

    model.train()
    for epoch in range(1, max_epochs + 1):
        wrong = 0
        for xb, yb in loader:
            logits = model(xb)
            loss = loss_fn(logits, yb)
            wrong += (logits.argmax(dim=1) != yb).sum().item()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        error = wrong / len(y)

        # Plateau rule: divide the lr by 4 after 10 epochs without a new lowest error.
        if error < best_error:
            best_error, epochs_without_improvement = error, 0
        else:
            epochs_without_improvement += 1
        if epochs_without_improvement == PLATEAU_EPOCHS:
            for group in optimizer.param_groups:
                group["lr"] /= LR_DIVISOR
            epochs_without_improvement = 0

        if error < TARGET_ERROR:
            break
    return epoch, error


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(xb).argmax(dim=1) for xb in x.split(1000)])


def run_reference(data_dir: str, width: int, regime: str, seed: int, subset: int,
                  max_epochs: int = 500) -> dict:
    """Measure the learnability and test accuracy of a shallow CNN of `width` filters.

    Args:
        data_dir: folder with the CIFAR-10 python batches (data_batch_1..5, test_batch).
        width: number of convolution filters of N1 and N2.
        regime: training data of N1, one of "true_data", "random_labels", "random_images".
        seed: seed of the D1/D2 split, the subsets, the random regimes, inits and shuffles.
        subset: images in each of D1, D2 and D3, a multiple of 10 (class-balanced).
        max_epochs: epoch limit of each training run.

    Returns:
        learnability and test_accuracy in percent, epochs run by N1 and N2, and the
        training 0-1 error (a fraction) of each network's last epoch.
    """
    if regime not in REGIMES:
        raise ValueError(f"invalid regime {regime!r}, expected one of {REGIMES}")
    if subset <= 0 or subset % NUM_CLASSES:
        raise ValueError(f"subset must be a positive multiple of 10, got {subset}")
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, got {max_epochs}")
    per_class = subset // NUM_CLASSES

    # D1 and D2 are disjoint halves of a per-seed permutation of the train set, and D3
    # comes from a permutation of the test set drawn next from the same generator.
    train_images, train_labels = load_batches(data_dir, [f"data_batch_{i}" for i in range(1, 6)])
    test_images, test_labels = load_batches(data_dir, ["test_batch"])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_labels))
    half = len(order) // 2
    d1 = take_balanced(order[:half], train_labels, per_class)
    d2 = take_balanced(order[half:], train_labels, per_class)
    d3 = take_balanced(rng.permutation(len(test_labels)), test_labels, per_class)

    x1, y1 = to_tensor(train_images[d1]), torch.from_numpy(train_labels[d1])
    x2 = to_tensor(train_images[d2])
    x3, y3 = to_tensor(test_images[d3]), torch.from_numpy(test_labels[d3])

    # Random regimes draw from their own generator so that the split above stays the same.
    regime_rng = np.random.default_rng([seed, 1])
    if regime != "true_data":
        y1 = torch.from_numpy(regime_rng.integers(0, NUM_CLASSES, size=subset))
    if regime == "random_images":
        x1 = torch.from_numpy(regime_rng.uniform(-1.0, 1.0, size=x1.shape).astype(np.float32))

    # N1 and N2 get different init and shuffle seeds derived from `seed`.
    torch.manual_seed(2 * seed)
    n1 = shallow_cnn(width)
    n1_epochs, n1_error = train(n1, x1, y1, seed=2 * seed, max_epochs=max_epochs)
    n1_on_d2, n1_on_d3 = predict(n1, x2), predict(n1, x3)

    torch.manual_seed(2 * seed + 1)
    n2 = shallow_cnn(width)
    n2_epochs, n2_error = train(n2, x2, n1_on_d2, seed=2 * seed + 1, max_epochs=max_epochs)
    n2_on_d3 = predict(n2, x3)

    return {
        "learnability": 100.0 * (n2_on_d3 == n1_on_d3).double().mean().item(),
        "test_accuracy": 100.0 * (n1_on_d3 == y3).double().mean().item(),
        "n1_epochs": n1_epochs,
        "n2_epochs": n2_epochs,
        "n1_train_error": n1_error,
        "n2_train_error": n2_error,
    }
