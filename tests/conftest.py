"""Shared fixtures: the real data folder and a fixed thread count."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path | None:
    """Return the folder with the real datasets: ``$ENGINE_DATA_DIR``, else ``../shared/data``."""
    candidates = [os.environ.get("ENGINE_DATA_DIR"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "cifar-10-batches-py" / "data_batch_1").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = real_data_dir()
    if path is None:
        pytest.skip("real CIFAR-10 not found: set ENGINE_DATA_DIR to a folder with cifar-10-batches-py/")
    return path


@pytest.fixture(autouse=True)
def _two_threads():
    # Timing-independent results need a fixed thread count; CI machines have 2 cores.
    previous = torch.get_num_threads()
    torch.set_flush_denormal(True)  # as the command line does: see engine.recipe.main
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True, scope="session")
def _private_autotune_cache(tmp_path_factory):
    # Autotuning writes its measurements to a cache file; tests keep theirs apart
    # from the user's, and start without earlier measurements.
    previous = os.environ.get("ENGINE_AUTOTUNE_CACHE")
    os.environ["ENGINE_AUTOTUNE_CACHE"] = str(tmp_path_factory.mktemp("autotune") / "autotune.json")
    yield
    if previous is None:
        os.environ.pop("ENGINE_AUTOTUNE_CACHE", None)
    else:
        os.environ["ENGINE_AUTOTUNE_CACHE"] = previous
