"""Every shipped recipe end to end on a tiny real subset, and the statistics it reports."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from engine import recipe as cli
from engine.experiments.recipes import list_recipes, load_recipe
from engine.results.store import RunStore
from kernels.reference import pairwise_agreement_reference

TINY = ["--seeds", "1", "--subset", "20", "--max-epochs", "2", "--quiet", "--no-fuse"]

# The cheapest N1 of each recipe keeps the suite fast; the grid code is the same.
NARROW = {
    "table1": ["--n1", "shallow_cnn_w16"],
    "table2": ["--n1", "vgg11", "--regimes", "true_data"],
    "table3": ["--n1", "mlp_d2_h64"],
    "table5": ["--n1", "shallow_cnn_w16"],
    "table6": ["--n1", "shallow_cnn_w16", "--n2", "shallow_cnn_w16"],
    "table8": [],
    "table9": ["--n1", "shallow_cnn_w16", "--n2", "shallow_cnn_w16"],
    "table10": ["--n1", "shallow_cnn_w16,shallow_cnn_w32", "--n2", "shallow_cnn_w16"],
    "table11": ["--n1", "mlp_d1_h64", "--n2", "mlp_d1_h64,mlp_d2_h64"],
    "table12": ["--n1", "vgg11", "--n2", "vgg11"],
    "table13": ["--n1", "vgg11"],
    "table14": ["--n1", "mlp_d1_h2,mlp_d1_h4"],
    "table7": [],
    "seed-agreement": ["--n1", "shallow_cnn_w16", "--seeds", "3"],
    "learning-curve": ["--n1", "shallow_cnn_w16"],
}


def read_summary(out):
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_catalog_is_complete():
    expected = {f"table{i}" for i in range(1, 15)} | {"seed-agreement", "learning-curve"}
    assert set(list_recipes()) == expected


@pytest.mark.parametrize("name", sorted(NARROW))
def test_recipe_runs_on_tiny_subset(name, data_dir, tmp_path):
    args = [name, *TINY, *NARROW[name], "--data-dir", str(data_dir), "--out", str(tmp_path)]
    assert cli.main(args) == 0
    rows = read_summary(tmp_path)
    recipe = load_recipe(name)
    assert {r["metric"] for r in rows} == set(recipe.metrics)
    assert all(r["missing"] == "0" and r["failed"] == "0" for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert table.startswith(f"# {name}:")
    assert "|D1| = |D2| = |D3| = 20" in table


def test_table4_without_cifar100_says_what_is_missing(data_dir, tmp_path, capsys):
    code = cli.main(["table4", *TINY, "--data-dir", str(data_dir), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    if (data_dir / "cifar-100-python" / "train").is_file():
        pytest.skip("CIFAR-100 is present here, so table4 trains instead")
    assert code == 2
    assert "cifar100 is not in" in err and "cifar-100-python/train" in err


def test_class_shares_sum_to_100(data_dir, tmp_path):
    assert cli.main(["table5", *TINY, "--n1", "shallow_cnn_w16", "--regimes", "true_data",
                     "--data-dir", str(data_dir), "--out", str(tmp_path)]) == 0
    shares = [float(r["mean"]) for r in read_summary(tmp_path) if r["metric"] == "class_share_d2"]
    assert len(shares) == 10
    assert sum(shares) == pytest.approx(100.0, abs=0.05)
    store = RunStore(tmp_path)
    (key,) = list(store.keys())
    counts = np.bincount(store.predictions(key)["d2"], minlength=10)
    np.testing.assert_allclose(shares, 100 * counts / 20, atol=0.005)


def test_tlp_plp_counts_add_up(data_dir, tmp_path):
    assert cli.main(["table7", *TINY, "--data-dir", str(data_dir), "--out", str(tmp_path)]) == 0
    rows = {r["key"]: float(r["mean"]) for r in read_summary(tmp_path) if r["metric"] == "tlp_plp_percent"}
    assert set(rows) == {"tlp=0,plp=0", "tlp=0,plp=1", "tlp=1,plp=0", "tlp=1,plp=1"}
    assert sum(rows.values()) == pytest.approx(100.0)
    metrics = {r["metric"]: float(r["mean"]) for r in read_summary(tmp_path) if r["metric"] != "tlp_plp_percent"}
    # PLP = 1 is learnability; TLP = 1 is N1's test accuracy.
    assert rows["tlp=0,plp=1"] + rows["tlp=1,plp=1"] == pytest.approx(metrics["learnability"], abs=0.02)
    assert rows["tlp=1,plp=0"] + rows["tlp=1,plp=1"] == pytest.approx(metrics["test_accuracy"], abs=0.02)


def test_seed_agreement_matrix(data_dir, tmp_path):
    args = ["seed-agreement", *TINY, "--n1", "shallow_cnn_w16", "--seeds", "3", "--max-epochs", "3",
            "--data-dir", str(data_dir), "--out", str(tmp_path)]
    assert cli.main(args) == 0
    rows = read_summary(tmp_path)
    matrix = {r["key"]: float(r["mean"]) for r in rows if r["metric"] == "seed_agreement"}
    assert len(matrix) == 9
    store = RunStore(tmp_path)
    by_seed = {store.record(k)["config"]["seed"]: store.predictions(k)["d3"] for k in store.keys()}
    expected = pairwise_agreement_reference(np.stack([by_seed[s] for s in range(3)]))
    for i in range(3):
        assert matrix[f"i={i},j={i}"] == 1.0
        for j in range(3):
            assert matrix[f"i={i},j={j}"] == pytest.approx(expected[i, j], abs=0.005)
    histogram = {r["key"]: float(r["mean"]) for r in rows if r["metric"] == "distinct_predictions"}
    assert set(histogram) == {"distinct=1", "distinct=2", "distinct=3"}
    assert sum(histogram.values()) == pytest.approx(100.0)
    table = (tmp_path / "table.md").read_text()
    assert "| shallow_cnn_w16 | 0 | 1.00 *(0/1 reached target) |" in table


def test_learning_curve_checkpoints(data_dir, tmp_path):
    args = ["learning-curve", "--seeds", "1", "--subset", "20", "--max-epochs", "6", "--quiet",
            "--n1", "shallow_cnn_w16", "--data-dir", str(data_dir), "--out", str(tmp_path)]
    assert cli.main(args) == 0
    rows = read_summary(tmp_path)
    epochs = {r["key"] for r in rows if r["metric"] == "learnability"}
    assert epochs == {"epoch=1", "epoch=2", "epoch=5", "epoch=10", "epoch=20", "epoch=50", "epoch=final"}
    store = RunStore(tmp_path)
    n1 = next(k for k in store.keys() if store.record(k)["config"]["role"] == "n1")
    predictions = store.predictions(n1)
    # Checkpoints past the last epoch hold the final network's predictions.
    np.testing.assert_array_equal(predictions["d3@50"], predictions["d3"])
    assert "d2@1" in predictions and "d3@5" in predictions
    errors = {r["key"]: float(r["mean"]) for r in rows if r["metric"] == "test_error"}
    accuracy = 100 * np.mean(predictions["d3@2"] == predictions["d3_labels"])
    assert errors["epoch=2"] == pytest.approx(100 - accuracy, abs=0.005)


def test_grid_over_two_regimes_splits_tables(data_dir, tmp_path):
    args = ["table10", *TINY, "--n1", "shallow_cnn_w16", "--n2", "shallow_cnn_w16",
            "--regimes", "true_data,random_labels", "--data-dir", str(data_dir), "--out", str(tmp_path)]
    assert cli.main(args) == 0
    table = (tmp_path / "table.md").read_text()
    assert "### regime true_data" in table
    assert "### regime random_labels" in table
    rows = {r["regime"]: r["mean"] for r in read_summary(tmp_path) if r["metric"] == "learnability"}
    for regime, mean in rows.items():
        assert f"| shallow_cnn_w16 | {mean}" in table.split(f"### regime {regime}")[1]
