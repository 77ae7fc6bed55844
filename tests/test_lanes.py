"""Lanes: networks trained at the same time in threads, with the results of training them alone."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import UsageError
from engine.experiments.deadline import TimeUp
from engine.experiments.dispatch import run_jobs
from engine.experiments.jobs import DataContext, run_job
from engine.experiments.plan import NetworkJob
from engine.experiments.runner import InProcessExecutor
from engine.models.registry import CIFAR10
from engine.training import TrainConfig, autotune
from engine.training.autotune import Candidate
from engine.training.execution import ExecutionOptions
from engine.training.lanes import Cancelled, measure_lanes, run_in_lanes

CPU = torch.device("cpu")
SUBSET = 200
LANES = ExecutionOptions(channels_last=True, compile="off", threads=1, lanes=2)


@pytest.fixture(scope="module")
def cifar(data_dir: Path) -> DataContext:
    return DataContext("cifar10", str(data_dir))


def _jobs(models: tuple[str, ...], config: TrainConfig) -> list[NetworkJob]:
    return [NetworkJob("n1", model, "cifar10", seed, SUBSET, "true_data", config) for model in models for seed in (0, 1)]


def test_lanes_give_the_results_of_training_alone(cifar: DataContext) -> None:
    config = TrainConfig(max_epochs=2)
    jobs = _jobs(("shallow_cnn_w8", "mlp_d1_h16"), config)
    results = list(run_jobs(jobs, cifar, CPU, execution=LANES))
    assert sorted(job.key for job, _, _ in results) == sorted(job.key for job in jobs)
    alone = ExecutionOptions(channels_last=True, compile="off", threads=1, lanes=1)
    for job, record, predictions in results:
        assert record["execution"]["lanes"] == 2
        assert record["threads"] == 1
        expected_record, expected = run_job(job, cifar, CPU, execution=alone)
        # Same arithmetic as alone with one thread: every number is equal.
        assert record["train_errors"] == expected_record["train_errors"], job.describe()
        for split in ("d2", "d3"):
            assert np.array_equal(predictions[split], expected[split]), job.describe()
    assert torch.get_num_threads() == 2, "the process's thread count is restored after the lanes"


def test_lanes_stop_at_the_time_limit(cifar: DataContext) -> None:
    jobs = _jobs(("shallow_cnn_w8",), TrainConfig(max_epochs=50))
    epochs = []

    def stop() -> bool:
        epochs.append(threading.current_thread().name)
        return len(epochs) > 3

    finished = []
    with pytest.raises(TimeUp):
        for job, record, _ in run_jobs(jobs, cifar, CPU, execution=LANES, stop=stop):
            finished.append(job.key)
    assert finished == [], "a network cut off before its stop rule is not returned"
    assert all(name.startswith("lane") for name in epochs), "both networks trained in lanes"


def test_run_in_lanes_runs_tasks_at_once() -> None:
    inside, peak = [0], [0]
    lock = threading.Lock()

    def task(value: int):
        def run(cancelled):
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= 1
            return [value, value + 100]

        return run

    results = list(run_in_lanes([(1.0, task(i)) for i in range(5)], lanes=2))
    assert sorted(results) == sorted([*range(5), *range(100, 105)])
    assert peak[0] == 2


def test_run_in_lanes_raises_first_error() -> None:
    started = []

    def good(cancelled):
        time.sleep(0.1)
        return ["good"]

    def bad(cancelled):
        raise ValueError("broken network")

    def later(cancelled):
        started.append("later")
        return ["later"]

    seen = []
    with pytest.raises(ValueError, match="broken network"):
        for result in run_in_lanes([(3.0, good), (2.0, bad), (1.0, later)], lanes=2):
            seen.append(result)
    assert seen == ["good"], "the running task's result is kept"
    assert started == [], "the queued task does not start"


def test_run_in_lanes_starts_longest_ready_task() -> None:
    def task(name: str):
        return lambda cancelled: [name]

    def follow(result: str):
        return [(5.0, task("released long")), (0.5, task("released short"))] if result == "first" else []

    tasks = [(1.0, task("short")), (9.0, task("first")), (2.0, task("middle"))]
    order = list(run_in_lanes(tasks, lanes=1, follow=follow))
    assert order == ["first", "released long", "middle", "short", "released short"]


def test_closing_the_lanes_cancels_running_tasks() -> None:
    stopped = []

    def long(cancelled):
        for _ in range(200):
            if cancelled():
                stopped.append(True)
                raise Cancelled()
            time.sleep(0.01)
        return ["long"]

    def short(cancelled):
        return ["short"]

    results = run_in_lanes([(2.0, long), (1.0, short)], lanes=2)
    assert next(results) == "short"
    results.close()
    assert stopped == [True]


def test_lanes_option_validates() -> None:
    with pytest.raises(UsageError, match="lanes=0"):
        ExecutionOptions(lanes=0)
    with pytest.raises(UsageError, match="--lanes 2 trains networks in CPU threads"):
        ExecutionOptions(lanes=2).check_device("cuda")
    assert ExecutionOptions().with_defaults().lanes == 1


def _lanes_sessions(lanes_speed: float, single_speed: float) -> dict:
    """Return cached lanes timings against one network on one thread, or on one and two."""
    one_thread, two_threads = "channels_last,compile=off,threads=1", "channels_last,compile=off,threads=2"
    return {
        f"2 lanes vs {one_thread}": {"lanes": lanes_speed, "one network": {one_thread: single_speed}},
        f"2 lanes vs {one_thread} & {two_threads}": {
            "lanes": lanes_speed, "one network": {one_thread: single_speed, two_threads: single_speed},
        },
    }


def _cached_tune(tmp_path: Path, lanes_speed: float, single_speed: float, concurrent_jobs: int = 4):
    """Tune with a cache entry that contains the given measurements, so nothing is timed."""
    options = ExecutionOptions(channels_last=True, compile="off")
    config = TrainConfig(max_epochs=1)
    path = tmp_path / "a.json"
    first = autotune.tune("shallow_cnn_w8", CIFAR10, config, 256, 1, CPU, options, cache=path)
    entries = json.loads(path.read_text())
    entry = entries[first.key]
    entry["images_per_s"] = {label: single_speed for label in entry["images_per_s"]}
    entry["lanes"] = {"channels_last": _lanes_sessions(lanes_speed, single_speed)}
    path.write_text(json.dumps(entries))
    return autotune.tune(
        "shallow_cnn_w8", CIFAR10, config, 256, 1, CPU, options, cache=path, concurrent_jobs=concurrent_jobs
    )


def test_tune_chooses_lanes_only_when_they_pay(tmp_path: Path) -> None:
    chosen = _cached_tune(tmp_path, lanes_speed=1500.0, single_speed=1000.0)
    assert (chosen.options.lanes, chosen.options.threads) == (2, 1)
    assert chosen.to_dict()["lanes_images_per_s"] == {"1": 1000.0, "2": 1500.0}
    rejected = _cached_tune(tmp_path, lanes_speed=1020.0, single_speed=1000.0)
    assert rejected.options.lanes == 1
    assert "not 1.05x" in rejected.lanes_reason
    alone = _cached_tune(tmp_path, lanes_speed=1500.0, single_speed=1000.0, concurrent_jobs=1)
    assert (alone.options.lanes, alone.lanes_reason) == (1, "one job")


def test_tune_measures_lanes_and_caches_them(tmp_path: Path) -> None:
    options = ExecutionOptions(channels_last=True, compile="off")
    path = tmp_path / "a.json"
    result = autotune.tune("mlp_d1_h16", CIFAR10, TrainConfig(max_epochs=1), 256, 2, CPU, options,
                           cache=path, concurrent_jobs=2)
    assert result.lanes_images_per_s[2] > 0
    entry = json.loads(path.read_text())[result.key]
    (session,) = entry["lanes"]["channels_last"].values()
    assert session["lanes"] == pytest.approx(result.lanes_images_per_s[2])
    assert max(session["one network"].values()) == pytest.approx(result.lanes_images_per_s[1])
    assert entry["images_per_s"], "the lanes entry keeps the one-network measurements"


def test_tune_times_lanes_again_for_larger_plans(tmp_path: Path) -> None:
    options = ExecutionOptions(channels_last=True, compile="off")
    path = tmp_path / "a.json"

    def lanes_timed_s(result) -> float:
        (session,) = json.loads(path.read_text())[result.key]["lanes"]["channels_last"].values()
        return session["timed_s"]

    small = autotune.tune("mlp_d1_h16", CIFAR10, TrainConfig(max_epochs=1), 256, 2, CPU, options,
                          cache=path, concurrent_jobs=2)
    assert lanes_timed_s(small) == autotune.MIN_LANES_BUDGET_S
    large = autotune.tune("mlp_d1_h16", CIFAR10, TrainConfig(max_epochs=500), 25_000, 50, CPU, options,
                          cache=path, concurrent_jobs=2)
    assert lanes_timed_s(large) == autotune.LANES_BUDGET_S
    again = autotune.tune("mlp_d1_h16", CIFAR10, TrainConfig(max_epochs=1), 256, 2, CPU, options,
                          cache=path, concurrent_jobs=2)
    assert again.source == "cache"
    assert lanes_timed_s(again) == autotune.LANES_BUDGET_S

    # A malformed lanes session is timed again, not read.
    for broken in ({"lanes": "fast"}, {"one network": {}}):
        entries = json.loads(path.read_text())
        for session in entries[again.key]["lanes"]["channels_last"].values():
            session.update(broken)
        path.write_text(json.dumps(entries))
        mended = autotune.tune("mlp_d1_h16", CIFAR10, TrainConfig(max_epochs=1), 256, 2, CPU, options,
                               cache=path, concurrent_jobs=2)
        assert mended.source == "measured", f"session with {broken} was read"
        assert mended.lanes_images_per_s[2] > 0


def test_user_lanes_share_the_threads(tmp_path: Path) -> None:
    result = autotune.tune(
        "mlp_d1_h16", CIFAR10, TrainConfig(max_epochs=1), 256, 2, CPU,
        ExecutionOptions(channels_last=False, compile="off", lanes=2), cache=tmp_path / "a.json",
    )
    assert (result.options.lanes, result.options.threads, result.lanes_reason) == (2, 1, "given")


def test_children_start_when_parent_finishes(cifar: DataContext) -> None:
    long = NetworkJob("n1", "shallow_cnn_w8", "cifar10", 0, SUBSET, "true_data", TrainConfig(max_epochs=12))
    short = NetworkJob("n1", "shallow_cnn_w8", "cifar10", 1, SUBSET, "true_data", TrainConfig(max_epochs=1))
    child = NetworkJob("n2", "shallow_cnn_w8", "cifar10", 1, SUBSET, "true_data", TrainConfig(max_epochs=1),
                       parent=short.key)
    order = [job.key for job, _, _ in run_jobs([long, short], cifar, CPU, execution=LANES, children=[child])]
    assert sorted(order) == sorted([long.key, short.key, child.key])
    assert order.index(child.key) < order.index(long.key), "the N2 trained while the long N1 still trained"


def test_children_train_on_parent_labels(cifar: DataContext) -> None:
    config = TrainConfig(max_epochs=1)
    parent = NetworkJob("n1", "mlp_d1_h16", "cifar10", 0, SUBSET, "true_data", config)
    child = NetworkJob("n2", "shallow_cnn_w8", "cifar10", 0, SUBSET, "true_data", config, parent=parent.key)
    alone = ExecutionOptions(channels_last=True, compile="off", threads=1, lanes=1)
    results = {job.key: (record, predictions)
               for job, record, predictions in run_jobs([parent], cifar, CPU, execution=LANES, children=[child])}
    labels = results[parent.key][1]["d2"]
    expected_record, expected = run_job(child, cifar, CPU, labels, execution=alone)
    assert results[child.key][0]["train_errors"] == expected_record["train_errors"]
    assert np.array_equal(results[child.key][1]["d3"], expected["d3"])


def test_child_of_failed_parent_not_trained(cifar: DataContext) -> None:
    parent = NetworkJob("n1", "shallow_cnn_w8", "cifar10", 0, SUBSET, "true_data", TrainConfig(max_epochs=3, lr=1e6))
    child = NetworkJob("n2", "shallow_cnn_w8", "cifar10", 0, SUBSET, "true_data", TrainConfig(max_epochs=1),
                       parent=parent.key)
    for execution in (LANES, None):
        results = list(run_jobs([parent], cifar, CPU, execution=execution, children=[child]))
        assert [job.key for job, _, _ in results] == [parent.key]
        assert results[0][1]["status"] == "failed"


def test_parent_and_only_child_not_in_lanes(cifar: DataContext) -> None:
    config = TrainConfig(max_epochs=1)
    parent = NetworkJob("n1", "shallow_cnn_w8", "cifar10", 0, SUBSET, "true_data", config)
    child = NetworkJob("n2", "shallow_cnn_w8", "cifar10", 0, SUBSET, "true_data", config, parent=parent.key)
    options = ExecutionOptions(channels_last=True, compile="off")
    results = list(run_jobs([parent], cifar, CPU, execution=options, children=[child]))
    assert len(results) == 2
    for _, record, _ in results:
        assert record["execution"]["lanes"] == 1, "an N2 never trains beside its own N1"
        assert record["autotune"]["lanes_reason"] == "one job"


def test_checkpointed_networks_train_outside_lanes(cifar: DataContext) -> None:
    job = NetworkJob("n1", "shallow_cnn_w8", "cifar10", 0, SUBSET, "true_data", TrainConfig(max_epochs=2),
                     checkpoints=(1,))
    ((_, record, predictions),) = InProcessExecutor(cifar, CPU, execution=LANES).run([job], {})
    assert record["execution"]["lanes"] == 1
    assert "d3@1" in predictions


class _FailsInThreads(torch.nn.Module):
    """A model whose forward raises outside the main thread, as an allocation failure in a lane would."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if threading.current_thread() is not threading.main_thread():
            raise MemoryError("lane out of memory")
        return self.layer(x.flatten(1))


def _measure(model: torch.nn.Module, outcome: list) -> None:
    try:
        outcome.append(measure_lanes(model, [Candidate(False, "off", 2)], (3, 4, 4), 8, "fp32", CPU, 2, 0.05))
    except BaseException as exc:  # noqa: BLE001 - the test inspects it
        outcome.append(exc)


def test_measure_lanes_raises_lane_error() -> None:
    outcome: list = []
    # Run in a thread of its own, with a timeout, so a hang fails the test instead of the suite.
    caller = threading.Thread(target=_measure, args=(_FailsInThreads(), outcome), daemon=True)
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), "measure_lanes hung after a lane failed"
    assert isinstance(outcome[0], MemoryError)


def test_measure_lanes_keeps_global_rng() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    together, alone = measure_lanes(model, [Candidate(False, "off", 1)], (3, 4, 4), 8, "fp32", CPU, 2, 0.05)
    assert torch.equal(torch.rand(3), expected)
    assert together > 0
    assert alone["nchw,compile=off,threads=1"] > 0
