"""The engine against a deliberately plain PyTorch implementation of the protocol.

Both train width-16 shallow CNNs to the stop rule on the same small real
configuration (true data, 200 images per split, 4 seeds). Their splits, inits and
batch orders differ, so the learnability values agree only up to seed noise.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference_protocol import run_reference

from engine import recipe as cli
from engine.experiments.plan import build_plan
from engine.experiments.recipes import load_recipe
from engine.results.store import RunStore
from engine.results.summary import summarize
from engine.training import TrainConfig

SEEDS = 4
SUBSET = 200
MAX_EPOCHS = 300


@pytest.mark.slow
def test_engine_matches_plain_reference(data_dir, tmp_path):
    reference = [run_reference(str(data_dir / "cifar-10-batches-py"), 16, "true_data", seed, SUBSET, MAX_EPOCHS)
                 for seed in range(SEEDS)]
    args = ["table1", "--n1", "shallow_cnn_w16", "--regimes", "true_data", "--seeds", str(SEEDS),
            "--subset", str(SUBSET), "--max-epochs", str(MAX_EPOCHS), "--quiet",
            "--data-dir", str(data_dir), "--out", str(tmp_path)]
    assert cli.main(args) == 0

    recipe = load_recipe("table1").narrowed(n1=("shallow_cnn_w16",), regimes=("true_data",), seeds=SEEDS)
    plan = build_plan(recipe, TrainConfig(max_epochs=MAX_EPOCHS), SUBSET)
    rows = {r.metric: r for r in summarize(plan, RunStore(tmp_path))}
    ours = np.array(rows["learnability"].values)
    theirs = np.array([r["learnability"] for r in reference])
    assert len(ours) == len(theirs) == SEEDS
    assert rows["learnability"].runs == SEEDS

    # Seed noise: the standard error of the difference of two means over SEEDS runs each,
    # with a floor of 3 points because 4 seeds estimate a spread poorly.
    noise = np.sqrt((ours.var(ddof=1) + theirs.var(ddof=1)) / SEEDS)
    gap = abs(ours.mean() - theirs.mean())
    assert gap <= max(3.0, 3 * noise), f"engine {ours} vs reference {theirs}"

    accuracy_ours = np.array(rows["test_accuracy"].values)
    accuracy_theirs = np.array([r["test_accuracy"] for r in reference])
    noise = np.sqrt((accuracy_ours.var(ddof=1) + accuracy_theirs.var(ddof=1)) / SEEDS)
    assert abs(accuracy_ours.mean() - accuracy_theirs.mean()) <= max(3.0, 3 * noise)
