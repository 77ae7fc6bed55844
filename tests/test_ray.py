"""Scale-out options, GPU lists, and a small real grid on local Ray CPU workers.

The Ray tests share one local instance (its start takes several seconds) and one
in-process reference run of the same grid.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO

from engine import recipe as cli
from engine.errors import UsageError
from engine.experiments.jobs import DataContext
from engine.experiments.plan import build_plan
from engine.experiments.recipes import load_recipe
from engine.experiments.runner import InProcessExecutor, run_plan
from engine.fused.trainer import FusedOptions
from engine.results.store import RunStore
from engine.scheduling import (
    add_scale_out_arguments,
    make_executor,
    parse_gpus,
    ray_executor,
    validate_scale_out,
)
from engine.scheduling.gpus import check_gpus_exist, cuda_index, visible_device_names
from engine.scheduling.ray_executor import RayExecutor, plan_units, usable_cpus
from engine.training import TrainConfig

WORKERS = 2
ONE_BY_ONE = FusedOptions(group_size=1)
GRID = ["--n1", "shallow_cnn_w16", "--regimes", "true_data,random_labels", "--seeds", "1", "--subset", "200"]
# The scale-out options are wired into the command line separately; until they are,
# the grid runs through ``run_plan`` with the same executor.
CLI_SCALES_OUT = "--workers" in cli.build_parser().format_help()
needs_cli = pytest.mark.skipif(not CLI_SCALES_OUT, reason="the command line has no --workers/--gpus yet")


# ---------------------------------------------------------------- GPU lists


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("0", [0]),
        ("0-3", [0, 1, 2, 3]),
        ("0-3,6", [0, 1, 2, 3, 6]),
        ("6, 0-1", [0, 1, 6]),
        ("2-2", [2]),
        ("all", [0, 1, 2, 3]),
        (" ALL ", [0, 1, 2, 3]),
    ],
)
def test_parse_gpus(spec, expected):
    assert parse_gpus(spec, available=4) == expected


@pytest.mark.parametrize("spec", ["", "a", "0-", "-1", "3-1", "0,,1", "0-3,2", "1.5", "cuda:0", "0;1"])
def test_parse_gpus_rejects_malformed(spec):
    with pytest.raises(UsageError, match="--gpus"):
        parse_gpus(spec, available=8)


def test_parse_gpus_all_without_gpus():
    with pytest.raises(UsageError, match="no CUDA GPU"):
        parse_gpus("all", available=0)


def test_missing_gpu_message_names_ids_and_count():
    with pytest.raises(UsageError) as excinfo:
        check_gpus_exist([0, 1, 4, 5], "0-1,4-5", available=4)
    message = str(excinfo.value)
    assert "GPUs 4, 5 not found" in message
    assert "this machine has 4 CUDA GPUs (0-3)" in message
    assert "--gpus 0-3" in message
    assert "\n" not in message


def test_visible_device_names_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_device_names([0, 2]) == ["0", "2"]
    assert visible_device_names([0, 2], visible="4,5,6") == ["4", "6"]
    assert visible_device_names([1], visible="GPU-aa, GPU-bb") == ["GPU-bb"]


def test_cuda_index_of_ray_gpu():
    assert cuda_index("3", "3") == 0  # Ray narrowed CUDA_VISIBLE_DEVICES to the task's GPU
    assert cuda_index(6, "4,5,6") == 2  # every GPU of the node is visible to the worker
    assert cuda_index(1, None) == 1
    with pytest.raises(RuntimeError, match="not in CUDA_VISIBLE_DEVICES"):
        cuda_index("7", "0,1")


# ---------------------------------------------------------------- options and factory


def parse_scale_out(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    add_scale_out_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workers", "2", "--gpus", "0"], "give only one of them"),
        (["--gpus", "0-1", "--cluster", "auto"], "drop --gpus"),
        (["--workers", "2", "--device", "cuda:0"], "drop --device"),
        (["--gpus", "0-x"], "not a GPU id or range"),
    ],
)
def test_validate_rejects_contradictions(argv, message):
    with pytest.raises(UsageError, match=message):
        validate_scale_out(parse_scale_out(argv))


@pytest.mark.parametrize("argv", [[], ["--workers", "2"], ["--cluster", "auto", "--workers", "4"], ["--gpus", "0-7"]])
def test_validate_accepts(argv):
    validate_scale_out(parse_scale_out(argv))


def test_workers_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        parse_scale_out(["--workers", "0"])
    assert "whole number >= 1" in capsys.readouterr().err


def test_default_executor_does_not_import_ray():
    code = (
        "import sys, torch\n"
        "from engine.fused.trainer import FusedOptions\n"
        "from engine.scheduling import make_executor\n"
        "executor = make_executor(None, 'cifar10', torch.device('cpu'), FusedOptions(), None, None, None)\n"
        "assert type(executor).__name__ == 'InProcessExecutor', type(executor)\n"
        "assert 'ray' not in sys.modules, 'the default path imported ray'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_missing_gpu_fails_before_ray_starts(monkeypatch):
    def must_not_start(*args, **kwargs):
        raise AssertionError("Ray was started although a listed GPU does not exist")

    monkeypatch.setattr(ray_executor, "start_local_ray", must_not_start)
    missing = str(torch.cuda.device_count())  # one past the last GPU, "0" on a CPU-only machine
    with pytest.raises(UsageError) as excinfo:
        make_executor(None, "cifar10", torch.device("cpu"), FusedOptions(), None, missing, None)
    message = str(excinfo.value)
    assert f"GPU {missing} not found" in message
    assert "\n" not in message


@needs_cli
def test_cli_missing_gpu_is_one_line_error(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ray_executor, "start_local_ray", lambda *a, **k: pytest.fail("Ray was started"))
    missing = str(torch.cuda.device_count())
    code = cli.main(["table1", *GRID, "--gpus", missing, "--data-dir", str(data_dir), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: --gpus {missing}: GPU {missing} not found")
    assert err.count("\n") == 1
    assert not (tmp_path / "networks").exists() or not any((tmp_path / "networks").iterdir())


def test_too_many_workers_rejected():
    with pytest.raises(UsageError, match="exceeds the .* CPU cores"):
        RayExecutor(None, "cifar10", ONE_BY_ONE, workers=usable_cpus() + 1)


def test_plan_units_by_group_size():
    recipe = load_recipe("table1").narrowed(n1=("shallow_cnn_w16", "shallow_cnn_w32"), seeds=3)
    jobs = build_plan(recipe, TrainConfig(), subset=100).n1_jobs
    assert len(jobs) == 18
    assert [len(unit) for unit in plan_units(jobs, 1, slots=4)] == [1] * 18
    fixed = plan_units(jobs, 4, slots=4)
    assert sorted(len(unit) for unit in fixed) == [3, 3, 3, 3, 3, 3]
    assert all(len({job.model for job in unit}) == 1 for unit in fixed)
    measured = plan_units(jobs, None, slots=4)
    assert sorted(len(unit) for unit in measured) == [2, 2, 2, 2, 2, 2, 3, 3]
    assert sorted(job.key for unit in measured for job in unit) == sorted(job.key for job in jobs)


# ---------------------------------------------------------------- a real grid on Ray


def small_plan(max_epochs: int):
    recipe = load_recipe("table1").narrowed(n1=("shallow_cnn_w16",), regimes=("true_data", "random_labels"), seeds=1)
    return build_plan(recipe, TrainConfig(max_epochs=max_epochs), subset=200)


@pytest.fixture(scope="module")
def ray_instance():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed: pip install -e '.[ray]'")
    started = ray_executor.start_local_ray(usable_cpus(), (), object_store_bytes=200 * 2**20)
    yield
    if started:
        import ray

        ray.shutdown()


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory):
    """The grid trained in this process, with the thread count of one Ray worker."""
    out = tmp_path_factory.mktemp("in_process")
    previous = torch.get_num_threads()
    torch.set_flush_denormal(True)
    torch.set_num_threads(max(1, usable_cpus() // WORKERS))
    try:
        executor = InProcessExecutor(DataContext("cifar10", str(data_dir)), torch.device("cpu"), ONE_BY_ONE)
        run_plan(small_plan(30), RunStore(out), executor, progress=False)
    finally:
        torch.set_num_threads(previous)
    return out


def crash_first_result(marker: str):
    """Wrap ``train_unit`` so that the first task to finish a network kills its own worker.

    The task trains its network, then SIGKILLs its process before returning the
    result, and writes the pid and job key to ``marker``. Every later task, the
    retry included, finds the marker and runs normally.
    """
    train_unit = ray_executor.train_unit

    def train_or_crash(setup, jobs, parent_d2):
        for result in train_unit(setup, jobs, parent_d2):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                yield result
                continue
            os.write(fd, json.dumps({"pid": os.getpid(), "key": result[0]}).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)

    return train_or_crash


@pytest.fixture(scope="module")
def ray_run(ray_instance, data_dir, tmp_path_factory):
    """The grid trained on 2 Ray CPU workers, one of which is killed mid-task.

    Returns the run directory, what the executor describes, and the killed worker's
    pid and job key.
    """
    out = tmp_path_factory.mktemp("ray")
    marker = out / "killed.json"
    train_fn = crash_first_result(str(marker))
    if CLI_SCALES_OUT:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ray_executor, "train_unit", train_fn)
            argv = ["table1", *GRID, "--max-epochs", "30", "--no-fuse", "--workers", str(WORKERS), "--quiet"]
            assert cli.main([*argv, "--data-dir", str(data_dir), "--out", str(out)]) == 0
        description = json.loads((out / "execution.json").read_text())
    else:
        with RayExecutor(str(data_dir), "cifar10", ONE_BY_ONE, workers=WORKERS, train_fn=train_fn) as executor:
            run_plan(small_plan(30), RunStore(out), executor, progress=False)
            description = executor.describe()
    return out, description, json.loads(marker.read_text())


def test_ray_matches_in_process(reference_run, ray_run):
    reference, ray_store = RunStore(reference_run), RunStore(ray_run[0])
    assert sorted(ray_store.keys()) == sorted(reference.keys())
    for key in reference.keys():
        expected, actual = reference.predictions(key), ray_store.predictions(key)
        for split in ("d2", "d3"):
            agreement = float(np.mean(actual[split] == expected[split]))
            assert agreement >= 0.995, f"network {key}: Ray and in-process agree on {agreement:.1%} of {split}"
        assert np.array_equal(actual["d3_labels"], expected["d3_labels"])
        assert ray_store.record(key)["epochs"] == reference.record(key)["epochs"]


def test_ray_records_worker(ray_run):
    out, description, _ = ray_run
    store = RunStore(out)
    for key in store.keys():
        record = store.record(key)
        assert record["status"] == "ok"
        assert record["threads"] == max(1, usable_cpus() // WORKERS)
        assert record["worker"]["gpu"] is None
    assert description["executor"] == "ray"
    assert description["tasks_at_once"] == WORKERS
    assert sum(description["networks_by_worker"].values()) == 4


def test_killed_worker_job_retried(ray_run):
    out, description, killed = ray_run
    store = RunStore(out)
    assert len(list(store.keys())) == 4
    assert description["lost"] == []
    retried = store.record(killed["key"])
    assert retried["status"] == "ok"
    assert retried["worker"]["pid"] != killed["pid"], "the killed worker's result was saved"


def test_interrupted_driver_resumes(ray_instance, data_dir, tmp_path, monkeypatch):
    plan = small_plan(5)
    real_save = RunStore.save
    saved = []

    def interrupt_after_one(self, key, *args, **kwargs):
        if saved:
            raise KeyboardInterrupt
        saved.append(key)
        return real_save(self, key, *args, **kwargs)

    monkeypatch.setattr(RunStore, "save", interrupt_after_one)
    with RayExecutor(str(data_dir), "cifar10", ONE_BY_ONE, workers=WORKERS) as executor:
        with pytest.raises(KeyboardInterrupt):
            run_plan(plan, RunStore(tmp_path), executor, progress=False)
        gc.collect()  # closes the abandoned result stream, which cancels its tasks
        assert sorted(RunStore(tmp_path).keys()) == saved

        resumed = []
        monkeypatch.setattr(
            RunStore, "save", lambda self, key, *a, **k: resumed.append(key) or real_save(self, key, *a, **k)
        )
        report = run_plan(plan, RunStore(tmp_path), executor, progress=False)
    assert report.reused == saved
    assert not set(resumed) & set(saved)
    assert len(resumed) == 3
    assert len(list(RunStore(tmp_path).keys())) == 4
