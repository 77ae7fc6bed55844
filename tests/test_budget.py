"""The time budget: parsing, the planner's arithmetic, epoch refinement, the deadline, and one real run."""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pytest
import torch

from engine.data.datasets import Dataset
from engine.errors import UsageError
from engine.experiments.deadline import Deadline, admit_jobs
from engine.experiments.jobs import DataContext
from engine.experiments.plan import build_plan
from engine.experiments.recipes import load_recipe
from engine.experiments.runner import InProcessExecutor, run_plan
from engine.models.registry import CIFAR10
from engine.results.store import RunStore
from engine.scheduling.budget import (
    FLOOR_PER_CLASS,
    BudgetError,
    format_duration,
    parse_budget,
    plan_within_budget,
    report_usage,
)
from engine.scheduling.calibration import (
    Calibration,
    FinishedRun,
    ModelSpeed,
    _bucket_speedup,
    calibrate,
    estimate_epochs,
    law_epochs,
)
from engine.training.config import TrainConfig

WIDTHS = (16, 32)


# -- parse_budget ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [("90s", 90), ("30m", 1800), ("1.5h", 5400), ("2h10m", 7800), (" 1h 30m ", 5400), (".5m", 30), ("45S", 45)],
)
def test_parse_budget_valid(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "30x", "m", "-5m", "1.2.3h", "5m-", "ten minutes", "0s", "0h0m"])
def test_parse_budget_invalid(text):
    with pytest.raises(UsageError) as caught:
        parse_budget(text)
    message = str(caught.value)
    assert repr(text) in message, message
    assert "90s, 30m, 1.5h" in message, message


@pytest.mark.parametrize("seconds", [0.4, 59.2, 60, 61, 750, 3599.5, 3600, 7801, 86400 + 5])
def test_format_duration_round_trip(seconds):
    text = format_duration(seconds)
    assert parse_budget(text) >= seconds, text
    assert parse_budget(text) < seconds + 60, text


# -- the planner with injected throughput ------------------------------------------


def synthetic_data(per_class_train: int = 400, per_class_test: int = 200) -> DataContext:
    """A tiny 10-class dataset in memory: full splits of 2000 images, at most 200 per class in a subset."""
    generator = torch.Generator().manual_seed(0)
    train_labels = torch.arange(10).repeat(per_class_train)
    test_labels = torch.arange(10).repeat(per_class_test)
    dataset = Dataset(
        "cifar10", CIFAR10,
        torch.randint(0, 256, (len(train_labels), 3, 32, 32), dtype=torch.uint8, generator=generator), train_labels,
        torch.randint(0, 256, (len(test_labels), 3, 32, 32), dtype=torch.uint8, generator=generator), test_labels,
    )
    return DataContext("cifar10", None, _dataset=dataset)


def fake_calibration(seconds_per_step_w16: float = 0.01, measure_time_s: float = 2.0) -> Calibration:
    """Step times that grow linearly with the width, as a shallow CNN's roughly do on a CPU."""
    speeds = {}
    for w in WIDTHS:
        step_s = seconds_per_step_w16 * w / 16
        speeds[f"shallow_cnn_w{w}", 64] = ModelSpeed(f"shallow_cnn_w{w}", 64, step_s, fixed_s=0.2 * step_s)
    return Calibration("cpu", speeds, measure_time_s)


@pytest.fixture(scope="module")
def data():
    return synthetic_data()


@pytest.fixture
def recipe():
    models = tuple(f"shallow_cnn_w{w}" for w in WIDTHS)
    return load_recipe("table10").narrowed(n1=models, n2=models, seeds=2)


def plan(recipe, budget_s, store, data, **kwargs):
    return plan_within_budget(
        recipe, TrainConfig(), budget_s, "cpu", store, data, calibration=fake_calibration(), **kwargs
    )


def full_plan_seconds(recipe, data, tmp_path):
    """Return the estimated total of the full splits (a budget far too large to need a subset)."""
    return plan(recipe, 1e9, RunStore(tmp_path / "probe"), data).total_s


def test_planner_large_budget_full_splits(recipe, data, tmp_path):
    budget = plan(recipe, 1e9, RunStore(tmp_path), data)
    assert budget.subset is None
    assert budget.images_per_split == 2000
    assert budget.max_epochs == 500
    assert not budget.cap_lowered
    assert budget.n_jobs == len(build_plan(recipe, TrainConfig(), None).jobs) == 2 * 2 + 2 * 2 * 2
    assert budget.total_s == pytest.approx(
        budget.spent_s + budget.calibration.measure_time_s + sum(j.seconds for j in budget.jobs) + budget.overhead_s
    )


def test_planner_job_estimate_arithmetic(recipe, data, tmp_path):
    budget = plan(recipe, 1e9, RunStore(tmp_path), data)
    job = next(j for j in budget.jobs if j.role == "n1" and j.model == "shallow_cnn_w32")
    # 31 full steps and one of 16 images: each pays the fixed 0.004 s, and the images 0.016 s per 64.
    epoch = math.ceil(2000 / 64) * 0.004 + 2000 / 64 * 0.016
    training = job.epochs * epoch
    predictions = 0.35 * (2000 + 2000) / 64 * 0.016  # forward passes over D2 and D3, per image
    assert job.epochs == pytest.approx(min(500, law_epochs("shallow_cnn_w32", "true_data", "n1", 2000)))
    assert job.seconds == pytest.approx(training + predictions + 0.1, rel=1e-6)


def test_planner_smaller_budget_subset(recipe, data, tmp_path):
    full = full_plan_seconds(recipe, data, tmp_path)
    budget = plan(recipe, full / 2, RunStore(tmp_path / "run"), data)
    assert budget.subset is not None
    assert FLOOR_PER_CLASS * 10 <= budget.subset < 2000
    assert budget.subset % 10 == 0, "a subset must be class-balanced"
    assert budget.max_epochs == 500, "the cap must stay while a subset fits"
    assert budget.total_s <= 0.85 * full / 2
    assert budget.tried[0]["subset"] is None
    assert not budget.tried[0]["fits"]
    assert "class-balanced subset" in budget.describe()


def test_planner_takes_largest_fitting_subset(recipe, data, tmp_path):
    full = full_plan_seconds(recipe, data, tmp_path)
    budget = plan(recipe, full / 2, RunStore(tmp_path / "run"), data)
    larger = [t for t in budget.tried if t["subset"] is not None and t["subset"] > budget.subset]
    assert larger, "the search should have tried larger subsets first"
    assert all(t["total_s"] > 0.85 * full / 2 for t in larger)


def test_planner_lowers_cap_only_below_floor(recipe, data, tmp_path):
    floor_total = _floor_total(recipe, data, tmp_path)
    budget = plan(recipe, 0.9 * floor_total / 0.85, RunStore(tmp_path / "run"), data)
    assert budget.subset == FLOOR_PER_CLASS * 10
    assert budget.cap_lowered
    assert budget.max_epochs < 500
    assert "lowered from 500" in budget.describe()
    assert [t["subset"] for t in budget.tried if t["max_epochs"] < 500] == [FLOOR_PER_CLASS * 10] * sum(
        t["max_epochs"] < 500 for t in budget.tried
    ), "only the floor subset may run with a lowered cap"


def _floor_total(recipe, data, tmp_path):
    """Return the estimated total of the floor subset at the full cap."""
    with pytest.raises(BudgetError) as caught:
        plan(recipe, 1.0, RunStore(tmp_path / "tiny"), data)
    return caught.value.needed_s * 0.85


def test_planner_rejects_with_needed_budget(recipe, data, tmp_path):
    with pytest.raises(BudgetError) as caught:
        plan(recipe, 1.0, RunStore(tmp_path / "run"), data)
    message = str(caught.value)
    needed = caught.value.needed_s
    assert isinstance(caught.value, UsageError)
    assert f"--budget {format_duration(needed)}" in message, message
    assert "50 images per class and epoch cap 500" in message, message
    assert "with the epoch cap lowered to 20" in message, message
    assert "\n" not in message
    least = parse_budget(message.split("(at least ")[1].split()[0])
    # The minimum budget trains at a lowered cap, and 10% below it nothing trains.
    lowered = plan(recipe, least, RunStore(tmp_path / "least"), data)
    assert lowered.cap_lowered
    with pytest.raises(BudgetError):
        plan(recipe, 0.9 * least, RunStore(tmp_path / "below"), data)
    budget = plan(recipe, parse_budget(format_duration(needed)), RunStore(tmp_path / "again"), data)
    assert budget.subset is not None
    assert budget.subset >= FLOOR_PER_CLASS * 10
    assert not budget.cap_lowered


def test_planner_never_below_floor(recipe, data, tmp_path):
    needed = _floor_total(recipe, data, tmp_path) / 0.85
    for share in (1.0, 0.7, 0.4):
        try:
            budget = plan(recipe, share * needed, RunStore(tmp_path / f"run{share}"), data)
        except BudgetError:
            continue
        assert budget.subset >= FLOOR_PER_CLASS * 10, share


def test_planner_counts_stored_networks_as_free(recipe, data, tmp_path):
    store = RunStore(tmp_path)
    first = plan(recipe, 1e9, store, data)
    stored = build_plan(recipe, TrainConfig(), None).jobs[0]
    assert stored.key == first.jobs[0].key
    store.save(stored.key, {"status": "ok", "config": stored.config(), "epochs": round(first.jobs[0].epochs)}, {})
    again = plan(recipe, 1e9, store, data)
    assert again.jobs[0].done
    assert again.jobs[0].seconds == 0
    assert again.n_to_train == first.n_to_train - 1


def test_plan_to_dict_is_json(recipe, data, tmp_path):
    budget = plan(recipe, 1e9, RunStore(tmp_path), data)
    saved = json.loads(json.dumps(budget.to_dict()))
    assert saved["subset"] is None
    assert saved["jobs"] == budget.n_jobs
    assert len(saved["job_estimates"]) == budget.n_jobs
    assert saved["estimated_total_s"] == pytest.approx(budget.total_s, abs=0.1)


def test_epoch_seconds_last_batch_and_fusion():
    speed = ModelSpeed("shallow_cnn_w16", 64, step_s=0.010, fixed_s=0.002, member_step_s={8: 0.005})
    # 3 full steps and one of 8 images: each step pays 0.002 s, each image 0.008 / 64 s.
    assert speed.epoch_seconds(200) == pytest.approx(4 * 0.002 + 200 / 64 * 0.008)
    assert speed.epoch_seconds(200, bucket_jobs=8) == pytest.approx(speed.epoch_seconds(200) / 2)
    assert speed.epoch_seconds(200, bucket_jobs=3) == speed.epoch_seconds(200), "no fused speed for this bucket"


def test_bucket_speedup_balanced_groups():
    images_per_s = {1: 100.0, 2: 150.0, 4: 200.0}
    assert _bucket_speedup(8, 4, images_per_s) == pytest.approx(2.0)
    # 5 jobs in groups of at most 4 train as groups of 3 and 2, credited at sizes 2 and 2.
    assert _bucket_speedup(5, 4, images_per_s) == pytest.approx(5 / 100 / (3 / 150 + 2 / 150))


# -- epoch estimates refined by finished runs --------------------------------------


def finished(model, epochs, n=500, regime="true_data", role="n1", cap=500):
    return FinishedRun(model, regime, role, n, epochs, cap)


def test_estimate_epochs_without_records_is_law():
    law = law_epochs("shallow_cnn_w16", "true_data", "n1", 1000)
    assert estimate_epochs("shallow_cnn_w16", "true_data", "n1", 1000, 10) == pytest.approx(law)
    assert estimate_epochs("shallow_cnn_w16", "true_data", "n1", 1000, 10, max_epochs=7) == 7


def test_estimate_epochs_refined_by_same_model():
    law = law_epochs("shallow_cnn_w16", "true_data", "n1", 500)
    records = [finished("shallow_cnn_w16", round(2 * law))] * 3
    refined = estimate_epochs("shallow_cnn_w16", "true_data", "n1", 1000, 10, finished_records=records)
    assert refined == pytest.approx(2 * law_epochs("shallow_cnn_w16", "true_data", "n1", 1000), rel=0.02)


def test_estimate_epochs_prefers_same_model_records():
    law16 = law_epochs("shallow_cnn_w16", "true_data", "n1", 500)
    law32 = law_epochs("shallow_cnn_w32", "true_data", "n1", 500)
    records = [finished("shallow_cnn_w16", round(0.5 * law16)), finished("shallow_cnn_w32", round(3 * law32))]
    refined = estimate_epochs("shallow_cnn_w16", "true_data", "n1", 500, 10, finished_records=records)
    assert refined == pytest.approx(0.5 * law16, rel=0.02)
    # A width without records of its own learns from its family.
    family = estimate_epochs("shallow_cnn_w64", "true_data", "n1", 500, 10, finished_records=records)
    law64 = law_epochs("shallow_cnn_w64", "true_data", "n1", 500)
    expected = (round(0.5 * law16) + round(3 * law32)) / (law16 + law32)
    assert family == pytest.approx(law64 * expected, rel=0.02)


def test_estimate_epochs_ignores_other_runs():
    records = [finished("shallow_cnn_w16", 499, regime="random_labels"), finished("shallow_cnn_w16", 499, role="n2")]
    plain = estimate_epochs("shallow_cnn_w16", "true_data", "n1", 500, 10)
    assert estimate_epochs("shallow_cnn_w16", "true_data", "n1", 500, 10, finished_records=records) == plain


def test_finished_run_from_record():
    record = {"status": "ok", "epochs": 42, "config": {
        "model": "shallow_cnn_w16", "regime": "true_data", "role": "n2", "subset": None, "train": {"max_epochs": 500},
    }}
    run = FinishedRun.from_record(record, full_split_size=25000)
    assert run == FinishedRun("shallow_cnn_w16", "true_data", "n2", 25000, 42, 500)
    assert FinishedRun.from_record({**record, "status": "failed"}, 25000) is None


def test_planner_uses_store_records(recipe, data, tmp_path):
    store = RunStore(tmp_path)
    before = plan(recipe, 1e9, store, data)
    n1 = next(j for j in before.jobs if j.role == "n1" and j.model == "shallow_cnn_w16")
    record = {"status": "ok", "epochs": round(2 * n1.epochs), "config": {
        "model": "shallow_cnn_w16", "regime": "true_data", "role": "n1", "subset": 999, "train": {"max_epochs": 500},
    }}
    store.save("unrelated-run", record, {})
    after = plan(recipe, 1e9, store, data)
    n1_after = next(j for j in after.jobs if j.key == n1.key)
    assert n1_after.epochs > 1.5 * n1.epochs


# -- the deadline ------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_deadline_counts_down():
    clock = FakeClock()
    deadline = Deadline(60, clock=clock)
    assert deadline.remaining() == 60
    assert not deadline.expired()
    clock.now += 45
    assert deadline.elapsed() == 45
    assert deadline.remaining() == 15
    assert deadline.should_start(15)
    assert not deadline.should_start(15.5)
    clock.now += 20
    assert deadline.expired()
    assert deadline.remaining() == 0
    assert not deadline.past_hard_limit()
    clock.now += 1.1
    assert deadline.past_hard_limit()


def test_deadline_pace_scales_estimates():
    clock = FakeClock()
    deadline = Deadline(100, clock=clock)
    assert deadline.pace == 1.0
    deadline.record(estimated_s=10, used_s=20)
    clock.now += 20
    assert deadline.pace == 2.0
    assert deadline.should_start(40)
    assert not deadline.should_start(41)
    deadline.record(estimated_s=1, used_s=1000)
    assert deadline.pace == 4.0, "the pace is clamped"


def test_deadline_rejects_nonpositive_budget():
    with pytest.raises(ValueError):
        Deadline(0)


def test_admit_jobs_prefix(recipe):
    clock = FakeClock()
    deadline = Deadline(30, clock=clock)
    jobs = build_plan(recipe, TrainConfig(), 500).jobs
    estimates = {job.key: 10.0 for job in jobs}
    admitted, skipped = admit_jobs(jobs, estimates, deadline)
    assert admitted == jobs[:3]
    assert skipped == jobs[3:]
    clock.now += 25
    admitted, skipped = admit_jobs(jobs, estimates, deadline)
    assert admitted == []
    assert skipped == jobs


def test_report_usage_text(recipe, data, tmp_path):
    budget = plan(recipe, 1e9, RunStore(tmp_path), data)
    line = report_usage(budget, used_s=budget.total_s * 1.25, not_computed=3)
    assert "planned" in line
    assert "used" in line
    assert "20% below the time used" in line, line
    assert "3 networks not computed" in line
    over = plan(recipe, budget.total_s, RunStore(tmp_path / "over"), data)
    assert "over the budget" in report_usage(over, used_s=2 * over.budget_s)


# -- one real run ------------------------------------------------------------------

REAL_BUDGET_S = 30.0
# The estimate must come within this share of the time used. It counts the calibration,
# the epochs the laws predict and the step time measured seconds before. On a machine
# shared with other processes, the step time drifts by tens of percent within a minute.
REAL_TOLERANCE = 0.5


@pytest.mark.slow
def test_real_budget_run(data_dir, tmp_path):
    # One thread: on a CPU shared with other processes, two threads per process were
    # measured up to 5x slower per step than one, and far less steady.
    torch.set_num_threads(1)
    deadline = Deadline(REAL_BUDGET_S)
    recipe = load_recipe("table1").narrowed(n1=("shallow_cnn_w16",), regimes=("true_data",), seeds=1)
    data = DataContext(recipe.dataset, str(data_dir))
    data.split(0, None)  # loads the data, as the command line does before planning
    # A cap of 100 epochs (as --max-epochs 100 would set) and a floor of 20 images per
    # class keep the smallest protocol within a 30 s budget on a slow machine.
    train = TrainConfig(max_epochs=100)
    try:
        budget = plan_within_budget(
            recipe, train, REAL_BUDGET_S, "cpu", None, data, spent_s=deadline.elapsed(), floor_per_class=20,
        )
    except BudgetError as exc:
        assert exc.needed_s > REAL_BUDGET_S
        pytest.skip(f"this machine is too slow for a {REAL_BUDGET_S:.0f} s budget now: {exc}")
    print(budget.describe())
    assert budget.n_jobs == 2
    assert budget.subset is None or budget.subset >= 200

    store = RunStore(tmp_path)
    network_plan = build_plan(recipe, budget.train_config(train), budget.subset)
    report = run_plan(network_plan, store, InProcessExecutor(data, torch.device("cpu")), progress=False)
    used = deadline.elapsed()
    print(report_usage(budget, used))
    for key in report.trained:
        record = store.record(key)
        print(f"{record['config']['role']}: {record['epochs']} epochs, {record['wall_time_s']:.1f} s")
    assert len(report.trained) == 2
    assert used <= REAL_BUDGET_S * 1.1, f"used {used:.1f} s of a {REAL_BUDGET_S:.0f} s budget"
    assert abs(budget.total_s - used) <= REAL_TOLERANCE * used, f"estimated {budget.total_s:.1f} s, used {used:.1f} s"


def test_calibrate_real_is_cached():
    started = time.perf_counter()
    first = calibrate(["shallow_cnn_w16"], CIFAR10, [64], "cpu", budget_s=0.2)
    speed = first.speed("shallow_cnn_w16", 64)
    assert speed.step_s > 0
    assert 0 < first.measure_time_s <= time.perf_counter() - started
    again = calibrate(["shallow_cnn_w16"], CIFAR10, [64], "cpu", budget_s=0.2)
    assert again.speed("shallow_cnn_w16", 64).step_s == speed.step_s
    assert again.measure_time_s < 0.05
    with pytest.raises(KeyError, match="not calibrated"):
        first.speed("shallow_cnn_w32", 64)


# -- the runner under a deadline ---------------------------------------------------


class ClockedExecutor:
    """Yields a made-up result per job and advances the fake clock by the job's seconds."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock = clock
        self.seconds = seconds
        self.calls: list[list[str]] = []

    def run(self, jobs, parent_d2, stop=None):
        self.calls.append([job.key for job in jobs])
        for job in jobs:
            self.clock.now += self.seconds
            record = {
                "key": job.key, "config": job.config(), "status": "ok", "failure": None,
                "stop_reason": "target_error", "epochs": 1, "final_train_error": 0.0, "wall_time_s": self.seconds,
            }
            d2 = np.zeros(500, dtype=np.int16)
            yield job, record, {"d2": d2, "d3": np.zeros(500, dtype=np.int16)}

    def describe(self):
        return {}


def test_runner_admits_fitting_kinds(recipe, tmp_path):
    clock = FakeClock()
    network_plan = build_plan(recipe, TrainConfig(), 500)
    estimates = {job.key: 10.0 for job in network_plan.jobs}
    deadline = Deadline(55, clock=clock)
    executor = ClockedExecutor(clock, seconds=10.0)
    report = run_plan(network_plan, RunStore(tmp_path), executor, progress=False, deadline=deadline,
                      estimates=estimates)
    # 4 N1 (2 widths x 2 seeds): the first kind (2 jobs, 20 s) and the second (20 s) fit in 55 s.
    # Then 15 s are left, the pace is 1: one N2 of the first N2 kind fits, nothing after it.
    by_model = {}
    for job in network_plan.n1_jobs:
        by_model.setdefault(job.model, []).append(job.key)
    assert executor.calls[:2] == list(by_model.values())
    assert len(report.trained) == 5
    assert sorted(report.trained + report.not_computed) == sorted(job.key for job in network_plan.jobs)
    assert all(len(call) <= 2 for call in executor.calls)


def test_runner_skips_orphaned_n2(recipe, tmp_path):
    clock = FakeClock()
    network_plan = build_plan(recipe, TrainConfig(), 500)
    estimates = {job.key: 30.0 for job in network_plan.jobs}
    report = run_plan(network_plan, RunStore(tmp_path), ClockedExecutor(clock, 30.0), progress=False,
                      deadline=Deadline(60, clock=clock), estimates=estimates)
    trained_n1 = {key for key in report.trained}
    for job in network_plan.n2_jobs:
        if job.parent not in trained_n1:
            assert job.key in report.not_computed
    assert len(report.trained) == 2


def test_runner_stops_past_hard_limit(recipe, tmp_path):
    clock = FakeClock()
    network_plan = build_plan(recipe, TrainConfig(), 500)
    # Estimates far too low: all N1 are admitted, but each takes 40 s of a 60 s budget.
    estimates = {job.key: 1.0 for job in network_plan.jobs}
    report = run_plan(network_plan, RunStore(tmp_path), ClockedExecutor(clock, 40.0), progress=False,
                      deadline=Deadline(60, clock=clock), estimates=estimates)
    # The second network ends at 80 s, past 66 s: nothing is started after it.
    assert len(report.trained) == 2
    assert len(report.not_computed) == len(network_plan.jobs) - 2


# -- the command line --------------------------------------------------------------


def cli_run(argv, data_dir, out, capsys):
    from engine import recipe as cli

    code = cli.main([*argv, "--data-dir", str(data_dir), "--out", str(out)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--budget", "30x"], "invalid budget '30x'; give a duration with a unit"),
        (["--budget", "5m", "--subset", "500"], "--budget 5m chooses the subset itself and contradicts --subset 500"),
        (["--budget", "5m", "--workers", "2"], "--budget 5m plans for training in this process"),
    ],
)
def test_cli_budget_errors(extra, expected, data_dir, tmp_path, capsys):
    code, err = cli_run(["table1", *extra], data_dir, tmp_path / "run", capsys)
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_tiny_budget_names_need(data_dir, tmp_path, capsys):
    started = time.perf_counter()
    code, err = cli_run(["table10", "--budget", "1m", "--quiet"], data_dir, tmp_path / "run", capsys)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: the grid needs about "), line
    needed = parse_budget(line.split("give --budget ")[1].split()[0])
    assert needed > 60
    assert not (tmp_path / "run").exists(), "nothing may be trained or written"
    # Only the plain steps of the 7 widths were timed, not tuned nor fused.
    assert "timed as a plain eager loop" in line
    assert time.perf_counter() - started < 60


@pytest.mark.slow
def test_cli_budget_run_saves_plan(data_dir, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    argv = ["table1", "--n1", "shallow_cnn_w16", "--n2", "shallow_cnn_w16", "--regimes", "true_data",
            "--seeds", "1", "--max-epochs", "60", "--budget", "45s", "--quiet", "--no-autotune", "--no-fuse"]
    code, err = cli_run(argv, data_dir, out, capsys)
    if code == 2 and "the grid needs about" in err:
        pytest.skip(f"this machine is too slow for a 45 s budget now: {err.strip()}")
    assert code == 0, err
    saved = json.loads((out / "budget.json").read_text())
    assert saved["jobs"] == 2
    assert saved["used_s"] > 0
    assert "planned" in saved["usage"]
    assert "used" in saved["usage"]
    assert saved["calibration"]["tuned"] is True
    run = json.loads((out / "run.json").read_text())
    assert run["subset"] == saved["subset"]
    assert run["train"]["max_epochs"] == saved["max_epochs"]
    stored = RunStore(out)
    assert len(list(stored.keys())) + len(saved["not_computed"]) == 2
    assert "budget 45s: training on" in caplog.text
    assert "budget 45s: planned" in caplog.text
    assert "incomplete_cells" in saved
    assert (out / "table.tex").is_file()
    assert (out / "missing.txt").is_file()
    table = (out / "table.md").read_text()
    if saved["subset"] is not None:
        assert f"{saved['subset']:,}" in table or str(saved["subset"]) in table


def test_run_job_time_up(data_dir):
    from engine.experiments.deadline import TimeUp
    from engine.experiments.jobs import run_job
    from engine.experiments.plan import NetworkJob

    data = DataContext("cifar10", str(data_dir))
    job = NetworkJob("n1", "shallow_cnn_w16", "cifar10", 0, 100, "true_data", TrainConfig(max_epochs=50))
    calls = []

    def stop() -> bool:
        calls.append(True)
        return len(calls) >= 3

    with pytest.raises(TimeUp, match="epoch 3"):
        run_job(job, data, torch.device("cpu"), stop=stop)
    assert len(calls) == 3


def test_fused_group_time_up(data_dir):
    from engine.experiments.deadline import TimeUp
    from engine.experiments.plan import NetworkJob
    from engine.fused.trainer import train_group

    data = DataContext("cifar10", str(data_dir))
    # One member stops at a cap of 2 epochs, the other would train 50.
    jobs = [
        NetworkJob("n1", "shallow_cnn_w16", "cifar10", 0, 100, "true_data", TrainConfig(max_epochs=2)),
        NetworkJob("n1", "shallow_cnn_w16", "cifar10", 1, 100, "true_data", TrainConfig(max_epochs=50)),
    ]
    epochs = []

    def stop() -> bool:
        epochs.append(True)
        return len(epochs) > 3

    results = train_group(jobs, data, "cpu", stop=stop)
    job, record, predictions = next(results)
    assert job.key == jobs[0].key
    assert record["epochs"] == 2
    assert "d3" in predictions
    with pytest.raises(TimeUp, match="1 shallow_cnn_w16 members of a fused group"):
        next(results)


def test_hopeless_grid_stops_timing(recipe, data, monkeypatch):
    import engine.scheduling.budget as budget_module
    from engine.training.execution import ExecutionOptions

    timed = []

    def slow_calibrate(models, spec, batches, device, **kwargs):
        # A step of 10 s, and 11 s spent timing it: past the patience after the first pair.
        model, batch = models[0], batches[0]
        timed.append((model, batch))
        return Calibration("cpu", {(model, batch): ModelSpeed(model, batch, 10.0)}, measure_time_s=11.0)

    monkeypatch.setattr(budget_module, "calibrate", slow_calibrate)
    with pytest.raises(BudgetError) as caught:
        plan_within_budget(recipe, TrainConfig(), 60.0, "cpu", None, data, execution=ExecutionOptions())
    message = str(caught.value)
    assert timed == [("shallow_cnn_w16", 64)]
    assert message.startswith("the grid needs more than "), message
    assert "the networks of shallow_cnn_w16 at batch 64 alone need that" in message
    assert caught.value.needed_s > 60


def test_calibration_counts_lanes_measured_faster(tmp_path, monkeypatch):
    from engine.training import autotune
    from engine.training.execution import ExecutionOptions

    cache = tmp_path / "autotune.json"
    monkeypatch.setenv(autotune.CACHE_ENV, str(cache))
    execution = ExecutionOptions(channels_last=True, compile="off")
    tuned = autotune.tune("shallow_cnn_w8", CIFAR10, TrainConfig(max_epochs=1), 256, 1, "cpu", execution)
    entries = json.loads(cache.read_text())
    entries[tuned.key]["images_per_s"] = {label: 1000.0 for label in entries[tuned.key]["images_per_s"]}
    one_thread, two_threads = "channels_last,compile=off,threads=1", "channels_last,compile=off,threads=2"
    entries[tuned.key]["lanes"] = {"channels_last": {
        f"2 lanes vs {one_thread}": {"lanes": 1600.0, "one network": {one_thread: 1000.0}},
        f"2 lanes vs {one_thread} & {two_threads}": {
            "lanes": 1600.0, "one network": {one_thread: 1000.0, two_threads: 1000.0},
        },
    }}
    cache.write_text(json.dumps(entries))

    measured = calibrate(
        ["shallow_cnn_w8"], CIFAR10, [64], "cpu", budget_s=0.1, execution=execution,
        lane_buckets={("shallow_cnn_w8", 64): [1, 4, 5]},
    )
    speed = measured.speed("shallow_cnn_w8", 64)
    assert speed.lanes == {4: 2, 5: 2}, "one job trains alone; four and five share two lanes"
    assert speed.member_step_s[4] == pytest.approx(64 / 1600)
    assert speed.member_step_s[5] == pytest.approx(64 / 1600 * 6 / 5), "the last of five runs with a lane idle"
    assert speed.epoch_seconds(640, 4) == pytest.approx(speed.epoch_seconds(640, 1) * 64 / 1600 / speed.step_s)


@pytest.mark.parametrize("autotune_on", [True, False])
def test_calibration_times_lanes_the_user_gave(tmp_path, monkeypatch, autotune_on):
    from engine.training import autotune
    from engine.training.execution import ExecutionOptions

    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "autotune.json"))
    execution = ExecutionOptions(lanes=2, autotune=autotune_on)
    measured = calibrate(
        ["mlp_d1_h16"], CIFAR10, [64], "cpu", budget_s=0.1, execution=execution,
        lane_buckets={("mlp_d1_h16", 64): [3]},
    )
    speed = measured.speed("mlp_d1_h16", 64)
    assert speed.lanes == {3: 2}
    assert 0 < speed.member_step_s[3] < 1
