"""The execution options on the command line: recorded with every network, checked before training."""

from __future__ import annotations

import importlib.util
import json
import logging

import numpy as np
import pytest

from engine import recipe as cli
from engine.experiments.dispatch import run_jobs
from engine.experiments.jobs import DataContext
from engine.experiments.plan import NetworkJob
from engine.fused.trainer import FusedOptions
from engine.results.store import RunStore
from engine.training import TrainConfig
from engine.training.execution import ExecutionOptions

GRID = ["--n1", "shallow_cnn_w16", "--n2", "shallow_cnn_w16", "--regimes", "true_data", "--seeds", "2",
        "--subset", "100", "--max-epochs", "3", "--quiet"]


def run_cli(extra, data_dir, out):
    return cli.main(["table1", *GRID, *extra, "--data-dir", str(data_dir), "--out", str(out)])


def records(out):
    store = RunStore(out)
    return [store.record(key) for key in store.keys()]


def test_options_reach_every_record(data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_cli(["--no-autotune", "--no-fuse", "--channels-last", "--threads", "1"], data_dir, out) == 0
    stored = records(out)
    assert len(stored) == 4
    for record in stored:
        assert record["execution"]["channels_last"] is True
        assert record["execution"]["compile"] == "off"
        assert record["threads"] == 1
        assert record["config"]["train"]["precision"] == "fp32"
    run = json.loads((out / "run.json").read_text())
    assert run["execution_options"]["channels_last"] is True
    assert run["execution_options"]["autotune"] is False
    table = (out / "table.md").read_text()
    assert "channels_last" in table
    assert "threads 1," in table


def test_no_autotune_trains_one_at_a_time(data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_cli(["--no-autotune"], data_dir, out) == 0
    for record in records(out):
        assert record["trainer"] == "single"
        assert record["autotune"]["group"]["reason"] == "autotuning off"


def test_autotune_choice_saved(data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_cli([], data_dir, out) == 0
    for record in records(out):
        assert record["execution"]["loader"] == "tensor"
        assert record["threads"] == record["execution"]["threads"]
        tuned = record["autotune"]
        assert tuned["chosen"] in tuned["images_per_s"], tuned
        assert tuned["group"]["group_size"] >= 1
    described = json.loads((out / "execution.json").read_text())
    assert described["autotune"], described
    assert described["execution"]["autotune"] is True
    run = json.loads((out / "run.json").read_text())
    assert run["execution"]["threads"] == ", ".join(sorted({str(r["threads"]) for r in records(out)}))
    # A rerun that reuses every network keeps the record of the run that trained them.
    assert run_cli([], data_dir, out) == 0
    assert json.loads((out / "execution.json").read_text()) == described


def test_lanes_reach_every_record(data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_cli(["--lanes", "2", "--channels-last", "--compile", "off"], data_dir, out) == 0
    stored = records(out)
    assert len(stored) == 4
    for record in stored:
        assert (record["execution"]["lanes"], record["threads"]) == (2, 1)
        assert record["autotune"]["lanes_reason"] == "given"
    assert "2 lanes" in (out / "table.md").read_text()


def test_lanes_beyond_cpus_warned(data_dir, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(cli, "usable_cpus", lambda: 2)
    with caplog.at_level(logging.WARNING):
        assert run_cli(["--lanes", "3", "--threads", "1", "--no-autotune"], data_dir, tmp_path / "run") == 0
    assert "--lanes 3 with 1 thread each runs 3 threads on 2 usable CPUs" in caplog.text


def test_amp_bf16_sets_the_protocol(data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_cli(["--amp", "bf16", "--no-autotune"], data_dir, out) == 0
    stored = records(out)
    assert {record["config"]["train"]["precision"] for record in stored} == {"bf16"}
    # The precision is part of each key: an fp32 run beside it trains its own networks.
    assert run_cli(["--no-autotune"], data_dir, out) == 0
    assert len(records(out)) == 8


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--amp", "fp16"], "--amp fp16 needs a CUDA GPU"),
        (["--compile", "reduce-overhead"], "--compile reduce-overhead records CUDA graphs"),
        (["--threads", "0"], "'0' must be positive"),
        (["--loader", "tape"], "invalid choice: 'tape'"),
        (["--lanes", "0"], "'0' must be positive"),
        (["--lanes", "2", "--group-size", "2"], "--lanes 2 trains networks one at a time in threads"),
        (["--lanes", "2", "--workers", "2"], "drop --lanes"),
        (["--lanes", "2", "--share-batches"], "contradicts --share-batches"),
    ],
)
def test_bad_options_exit_2(extra, expected, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        raise SystemExit(run_cli(extra, data_dir, tmp_path / "run"))
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert expected in err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("ffcv") is not None, reason="FFCV is installed here")
def test_missing_ffcv_named_before_training(data_dir, tmp_path, capsys):
    code = run_cli(["--loader", "ffcv"], data_dir, tmp_path / "run")
    err = capsys.readouterr().err
    assert code == 2
    assert "learnability-engine[ffcv]" in err or "[ffcv]" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="DALI is not installed")
def test_dali_loader_matches_tensor_loader(data_dir, tmp_path):
    plain, dali = tmp_path / "plain", tmp_path / "dali"
    assert run_cli(["--no-autotune", "--no-fuse"], data_dir, plain) == 0
    assert run_cli(["--no-autotune", "--loader", "dali"], data_dir, dali) == 0
    for record in records(dali):
        assert record["trainer"] == "single"
        assert record["execution"]["loader"] == "dali"
    for key in RunStore(plain).keys():
        ours, theirs = RunStore(plain).predictions(key), RunStore(dali).predictions(key)
        assert RunStore(plain).record(key)["epochs"] == RunStore(dali).record(key)["epochs"]
        np.testing.assert_array_equal(ours["d3"], theirs["d3"])


def test_plain_options_match_default(data_dir):
    data = DataContext("cifar10", str(data_dir))
    train = TrainConfig(max_epochs=3)
    jobs = [NetworkJob("n1", "shallow_cnn_w16", "cifar10", seed, 100, "true_data", train) for seed in (0, 1)]
    options = FusedOptions(group_size=1)
    default = list(run_jobs(jobs, data, "cpu", options=options))
    plain = list(run_jobs(jobs, data, "cpu", options=options, execution=ExecutionOptions(autotune=False)))
    for (_, record_a, predictions_a), (_, record_b, predictions_b) in zip(default, plain):
        assert record_a["train_errors"] == record_b["train_errors"]
        np.testing.assert_array_equal(predictions_a["d3"], predictions_b["d3"])
        assert record_b["autotune"]["source"] == "fixed"


def test_unwritable_loader_cache_exit_2(data_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = run_cli(["--loader-cache", str(blocker / "cache")], data_dir, tmp_path / "run")
    err = capsys.readouterr().err
    assert code == 2
    assert f"--loader-cache '{blocker / 'cache'}' cannot be written" in err
    assert err.count("\n") == 1, err


def test_other_protocol_in_folder_warned(data_dir, tmp_path, caplog):
    out = tmp_path / "run"
    assert run_cli(["--no-autotune"], data_dir, out) == 0
    caplog.set_level(logging.WARNING)
    assert run_cli(["--no-autotune", "--max-epochs", "2"], data_dir, out) == 0
    assert "contains 4 networks of another protocol (max_epochs 3 -> 2)" in caplog.text
    assert len(records(out)) == 8
    caplog.clear()
    assert run_cli(["--no-autotune", "--max-epochs", "2", "--amp", "bf16"], data_dir, out) == 0
    assert "another protocol (precision fp32 -> bf16)" in caplog.text


def test_width_outside_study_warned(data_dir, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    args = ["table1", "--n1", "shallow_cnn_w17", "--seeds", "1", "--subset", "100", "--max-epochs", "1",
            "--regimes", "true_data", "--no-autotune", "--quiet", "--data-dir", str(data_dir), "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert "shallow_cnn_w17 is not among the study's networks (shallow_cnn_w16, shallow_cnn_w32," in caplog.text
    assert len(records(tmp_path)) == 2, "an unstudied width still trains"
