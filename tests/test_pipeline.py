"""The recipe pipeline end to end on a small real CIFAR-10 subset, and resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO

from engine import recipe as cli
from engine.experiments import runner
from engine.results.store import RunStore

SMALL = ["--n1", "shallow_cnn_w16", "--seeds", "1", "--subset", "200", "--max-epochs", "150", "--quiet"]


def run_cli(args, data_dir, out):
    return cli.main(["table1", *args, "--data-dir", str(data_dir), "--out", str(out)])


@pytest.fixture(scope="module")
def table1_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("table1")
    code = run_cli(SMALL + ["--regimes", "true_data,random_labels"], data_dir, out)
    assert code == 0
    return out


def read_summary(out):
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_every_network_saved(table1_run):
    store = RunStore(table1_run)
    records = [store.record(k) for k in store.keys()]
    assert sorted(r["config"]["role"] for r in records) == ["n1", "n1", "n2", "n2"]
    for r in records:
        assert r["status"] == "ok"
        for field in ("epochs", "final_train_error", "stop_reason", "lr_drops", "wall_time_s", "config"):
            assert field in r
        preds = store.predictions(r["key"])
        assert preds["d3"].dtype == np.uint8
        assert preds["d2"].shape == preds["d3"].shape == (200,)


def test_summary_matches_predictions(table1_run):
    store = RunStore(table1_run)
    records = {r["key"]: r for r in map(store.record, store.keys())}
    rows = {(r["regime"], r["metric"]): r for r in read_summary(table1_run)}
    for regime in ("true_data", "random_labels"):
        n1 = next(r for r in records.values() if r["config"]["role"] == "n1" and r["config"]["regime"] == regime)
        n2 = next(r for r in records.values() if r["config"]["parent"] == n1["key"])
        p1, p2 = store.predictions(n1["key"]), store.predictions(n2["key"])
        learn = 100 * np.mean(p1["d3"] == p2["d3"])
        assert float(rows[regime, "learnability"]["mean"]) == pytest.approx(learn, abs=0.005)
        assert rows[regime, "learnability"]["runs"] == "1"
        reached = int(n1["reached_target"] and n2["reached_target"])
        assert rows[regime, "learnability"]["reached_target"] == str(reached)
    accuracy = float(rows["true_data", "test_accuracy"]["mean"])
    assert 15 < accuracy < 60  # 200 training images: well above chance, well below the full-data 54%
    assert rows["true_data", "learnability"]["paper_mean"] == "58.81"


def test_n2_learns_n1_labels(table1_run):
    store = RunStore(table1_run)
    for key in store.keys():
        record = store.record(key)
        if record["config"]["role"] == "n2" and record["reached_target"]:
            parent = store.predictions(record["config"]["parent"])
            own = store.predictions(key)
            assert np.mean(own["d2"] == parent["d2"]) > 0.95


def test_table_header_states_protocol(table1_run):
    table = (table1_run / "table.md").read_text()
    assert "|D1| = |D2| = |D3| = 200" in table
    assert "epoch cap 150 (the study uses 500)" in table
    assert "1 seed (0); the study uses 5" in table
    assert "device cpu, precision fp32" in table
    assert "| shallow_cnn_w16 |" in table
    assert "[58.81 ± 0.40]" in table


def test_rerun_trains_nothing(table1_run, data_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "run_jobs", lambda jobs, *a, **k: calls.extend(jobs) or iter(()))
    before = {k: RunStore(table1_run).record(k)["finished_at"] for k in RunStore(table1_run).keys()}
    assert run_cli(SMALL + ["--regimes", "true_data,random_labels"], data_dir, table1_run) == 0
    assert calls == []
    after = {k: RunStore(table1_run).record(k)["finished_at"] for k in RunStore(table1_run).keys()}
    assert before == after


def test_shared_n1_trained_once(data_dir, tmp_path):
    from engine.experiments.plan import build_plan
    from engine.experiments.recipes import load_recipe
    from engine.training import TrainConfig

    recipe = load_recipe("table10").narrowed(n1=("shallow_cnn_w16",), n2=("shallow_cnn_w16", "shallow_cnn_w32"), seeds=2)
    plan = build_plan(recipe, TrainConfig(), subset=100)
    assert len(plan.n1_jobs) == 2
    assert len(plan.n2_jobs) == 4
    assert len({c.n1_key for c in plan.cells}) == 2


@pytest.mark.parametrize("fuse", [["--no-fuse"], ["--group-size", "3"]])
def test_interrupt_then_resume(data_dir, tmp_path, monkeypatch, fuse):
    real = RunStore.save
    saved = []

    def interrupt_after_two(self, key, *args, **kwargs):
        if len(saved) == 2:
            raise KeyboardInterrupt
        saved.append(key)
        return real(self, key, *args, **kwargs)

    args = SMALL + fuse + ["--regimes", "true_data,random_labels,random_images", "--max-epochs", "5"]
    monkeypatch.setattr(RunStore, "save", interrupt_after_two)
    assert run_cli(args, data_dir, tmp_path) == 130
    assert sorted(RunStore(tmp_path).keys()) == sorted(saved)

    resumed = []
    monkeypatch.setattr(RunStore, "save", lambda self, key, *a, **k: resumed.append(key) or real(self, key, *a, **k))
    assert run_cli(args, data_dir, tmp_path) == 0
    assert not set(resumed) & set(saved)
    assert len(resumed) == 4
    assert len(list(RunStore(tmp_path).keys())) == 6


def test_kill_midway_then_resume(data_dir, tmp_path):
    """SIGKILL the real command after its first network is saved; the rerun keeps it."""
    args = [sys.executable, "-m", "engine.recipe", "table1", "--n1", "shallow_cnn_w16", "--seeds", "1",
            "--subset", "200", "--max-epochs", "40", "--regimes", "true_data,random_labels", "--quiet",
            "--data-dir", str(data_dir), "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    networks = tmp_path / "networks"
    deadline = time.time() + 120
    while time.time() < deadline and not list(networks.glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p.stem: json.loads(p.read_text())["finished_at"] for p in networks.glob("*.json")}
    assert 1 <= len(first) < 4
    # Every record under its final name has its predictions beside it: nothing is half-written.
    assert all((networks / f"{key}.npz").is_file() for key in first)
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = {p.stem: json.loads(p.read_text())["finished_at"] for p in networks.glob("*.json")}
    assert len(final) == 4
    assert all(final[k] == v for k, v in first.items())
    assert "reused 0" not in done.stderr


def test_sigterm_midway_then_resume(data_dir, tmp_path):
    """SIGTERM the real command after its first network is saved. It prints how to resume, and the rerun resumes."""
    args = [sys.executable, "-m", "engine.recipe", "table1", "--n1", "shallow_cnn_w16", "--seeds", "1",
            "--subset", "200", "--max-epochs", "40", "--regimes", "true_data,random_labels", "--quiet",
            "--data-dir", str(data_dir), "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    networks = tmp_path / "networks"
    deadline = time.time() + 120
    while time.time() < deadline and not list(networks.glob("*.json")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    saved = sorted(p.stem for p in networks.glob("*.json"))
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert f"terminated (SIGTERM): {len(saved)} networks are saved" in stderr
    assert "Traceback" not in stderr
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(list(networks.glob("*.json"))) == 4
    assert f"reused {len(saved)}" in done.stderr


def test_diverging_runs_recorded_and_grid_goes_on(data_dir, tmp_path):
    recipe = tmp_path / "diverge.toml"
    recipe.write_text(
        'title = "lr far too large"\ndataset = "cifar10"\n'
        'n1 = ["shallow_cnn_w16", "mlp_d1_h64"]\nn2 = "same"\nregimes = ["true_data"]\nseeds = 1\n'
        "[train]\nlr = 1e6\n"
    )
    out = tmp_path / "run"
    args = [str(recipe), "--subset", "100", "--max-epochs", "20", "--quiet", "--no-fuse",
            "--data-dir", str(data_dir), "--out", str(out)]
    assert cli.main(args) == 0
    store = RunStore(out)
    records = [store.record(k) for k in store.keys()]
    assert len(records) == 2  # both N1 were tried; their N2 are blocked
    for record in records:
        assert record["status"] == "failed"
        assert record["stop_reason"] == "diverged"
        assert "non-finite loss" in record["failure"]
    rows = read_summary(out)
    assert {r["failed"] for r in rows} == {"1"}
    assert {r["runs"] for r in rows} == {"0"}
    assert "missing (0/1 runs, 1 failed)" in (out / "table.md").read_text()
