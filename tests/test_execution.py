"""Execution options, compilation, autotuning, and the bf16 fidelity guard on real data."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging

import numpy as np
import pytest
import torch

from engine.data import load_dataset, make_split, n1_training_set
from engine.errors import UsageError
from engine.models import create_model
from engine.models.registry import CIFAR10
from engine.training import TrainConfig, autotune, predict, train_network
from engine.training.execution import ExecutionOptions, add_execution_arguments

PLAIN = ExecutionOptions(autotune=False)


@pytest.fixture(scope="module")
def cifar(data_dir):
    return load_dataset("cifar10", data_dir)


@pytest.fixture(scope="module")
def small(cifar):
    # 100 images with batch 64: one full batch and a last batch of 36.
    split = make_split(cifar, 0, subset=100)
    return n1_training_set(cifar, split, "true_data")


def trained(small, execution, name="shallow_cnn_w16", seed=0, **config):
    torch.manual_seed(seed)
    model = create_model(name)
    outcome = train_network(model, *small, TrainConfig(**config), order_seed=seed, execution=execution)
    return model, outcome


def parse(argv):
    parser = argparse.ArgumentParser()
    add_execution_arguments(parser)
    return ExecutionOptions.from_args(parser.parse_args(argv))


def test_cli_defaults_autotune():
    options = parse([])
    assert options == ExecutionOptions()
    assert options.autotune
    assert options.loader == "tensor"
    assert options.channels_last is None
    assert options.compile is None
    assert options.precision == "fp32"


def test_cli_flags():
    options = parse([
        "--loader", "dali", "--channels-last", "--compile", "max-autotune", "--amp", "bf16",
        "--threads", "1", "--no-autotune", "--loader-cache", "betons",
    ])
    assert options == ExecutionOptions(
        loader="dali", channels_last=True, compile="max-autotune", threads=1, amp="bf16",
        autotune=False, cache_dir="betons",
    )
    assert options.precision == "bf16"
    assert parse(["--no-channels-last"]).channels_last is False


@pytest.mark.parametrize(
    "values, message",
    [
        ({"loader": "webdataset"}, "choose from tensor, ffcv, dali"),
        ({"compile": "fast"}, "choose from off, default, reduce-overhead, max-autotune"),
        ({"amp": "fp8"}, "choose from off, bf16, fp16"),
        ({"threads": 0}, "positive integer"),
    ],
)
def test_invalid_option_names_choices(values, message):
    with pytest.raises(UsageError, match=message):
        ExecutionOptions(**values)


def test_fp16_rejected_on_cpu():
    with pytest.raises(UsageError, match="--amp fp16 needs a CUDA GPU"):
        ExecutionOptions(amp="fp16").check_device("cpu")
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        PLAIN.check_device("cpu", precision="fp16")


def test_amp_must_match_config_precision(small):
    with pytest.raises(UsageError, match="TrainConfig\\(precision=options.precision\\)"):
        trained(small, ExecutionOptions(amp="bf16", autotune=False), max_epochs=1)


def test_reduce_overhead_rejected_on_cpu():
    with pytest.raises(UsageError, match="needs a CUDA GPU"):
        ExecutionOptions(compile="reduce-overhead").check_device("cpu")


def test_options_json_ready():
    record = json.loads(json.dumps(PLAIN.with_defaults().to_dict()))
    assert record["compile"] == "off"
    assert record["channels_last"] is False


def test_plain_options_equal_default_path(small):
    default_model, default = trained(small, None, max_epochs=2)
    plain_model, plain = trained(small, PLAIN, max_epochs=2)
    assert plain.train_errors == default.train_errors
    for a, b in zip(default_model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b), "plain execution options changed the weights"
    assert default.execution["compile"] == "off"
    assert default.execution["loader"] == "tensor"


def _dali_installed() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not _dali_installed(), reason="DALI is not installed (pip install -e '.[dali]')")
def test_dali_loader_trains_bitwise_equal(small):
    tensor_model, _ = trained(small, PLAIN, max_epochs=2)
    dali_model, outcome = trained(small, ExecutionOptions(autotune=False, loader="dali"), max_epochs=2)
    assert outcome.execution["loader"] == "dali"
    for a, b in zip(tensor_model.parameters(), dali_model.parameters()):
        assert torch.equal(a, b), "the DALI loader changed the weights"


def test_channels_last_and_threads(small):
    previous = torch.get_num_threads()
    model, outcome = trained(small, ExecutionOptions(autotune=False, channels_last=True, threads=1), max_epochs=2)
    assert torch.get_num_threads() == previous, "the thread count was not restored"
    assert outcome.execution["channels_last"] is True
    assert outcome.execution["threads"] == 1
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain_model, plain = trained(small, PLAIN, max_epochs=2)
    # Another summation order: close to the NCHW run, not bitwise equal.
    for a, b in zip(model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    images = small[0]
    agree = (predict(model, images, channels_last=True) == predict(plain_model, images)).mean()
    assert agree > 0.95, f"channels_last predictions agree with NCHW on only {agree:.0%}"


@pytest.mark.slow
def test_compile_once_per_architecture(small):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    options = ExecutionOptions(autotune=False, compile="default", threads=1)
    _, first = trained(small, options, name="mlp_d1_h64", max_epochs=3)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1, f"{graphs} graphs compiled for one architecture; the last batch must run eager"
    _, second = trained(small, options, name="mlp_d1_h64", seed=1, max_epochs=3)
    assert counters["stats"]["unique_graphs"] == 1, "a second job of the same architecture compiled again"
    eager_model, eager = trained(small, PLAIN, name="mlp_d1_h64", max_epochs=3)
    assert first.execution["compile"] == "default"
    np.testing.assert_allclose(first.train_errors, eager.train_errors, atol=0.03)


def test_autotune_measures_then_reuses_cache(tmp_path):
    model = create_model("shallow_cnn_w16")
    path = tmp_path / "autotune.json"
    args = dict(model=model, input_shape=(3, 32, 32), batch_size=64, precision="fp32", device="cpu",
                options=ExecutionOptions(), planned_steps=10, cache=path, budget_s=0.03)
    first = autotune.tune_module(**args)
    assert first.source == "measured"
    assert first.options.resolved
    assert len(first.images_per_s) == 2 * len(autotune.thread_counts(torch.device("cpu")))
    assert "compile" in first.skipped, "10 steps cannot repay a compilation, so compile is not timed"
    entries = json.loads(path.read_text())
    assert list(entries) == [first.key]
    second = autotune.tune_module(**args)
    assert second.source == "cache"
    assert second.options == first.options
    assert second.images_per_s == first.images_per_s


def test_autotune_keeps_user_choices_and_precision(tmp_path):
    model = create_model("shallow_cnn_w16")
    result = autotune.tune_module(
        model, (3, 32, 32), 64, "bf16", "cpu",
        ExecutionOptions(amp="bf16", channels_last=True, compile="off", threads=1),
        planned_steps=10, cache=tmp_path / "a.json", budget_s=0.03,
    )
    assert result.options.channels_last is True
    assert result.options.threads == 1
    assert result.options.amp == "bf16"
    assert result.key.endswith("|bf16")
    assert result.source == "fixed", "one candidate left: nothing to measure"


def test_autotune_compile_only_when_it_pays(tmp_path):
    # A cache entry as a previous run would leave it: compiled steps 2x faster, 20 s to compile.
    model = create_model("mlp_d1_h64")
    key = autotune.cache_key("mlp_d1_h64", (3, 32, 32), 64, "fp32", torch.device("cpu"))
    threads = torch.get_num_threads()
    labels = {mode: autotune.Candidate(False, mode, threads).label for mode in ("off", "default")}
    autotune.save_entry(tmp_path / "a.json", key, {
        "images_per_s": {labels["off"]: 1000.0, labels["default"]: 2000.0},
        "compile_s": {labels["default"]: 20.0},
        "failed": {},
    })
    options = ExecutionOptions(threads=threads)
    args = dict(input_shape=(3, 32, 32), batch_size=64, precision="fp32", device="cpu", options=options,
                name="mlp_d1_h64", cache=tmp_path / "a.json")
    # 100 steps: 6.4 s eager, 3.2 s compiled + 20 s compiling.
    short = autotune.tune_module(model, planned_steps=100, **args)
    assert short.options.compile == "off"
    # 10,000 steps: 640 s eager, 320 s compiled + 20 s compiling.
    long = autotune.tune_module(model, planned_steps=10_000, **args)
    assert long.options.compile == "default"
    assert long.source == "cache"


def test_timing_budget_follows_planned_work():
    floor, ceiling = autotune.MIN_BUDGET_S, autotune.BUDGET_S
    assert autotune.timing_budget(None, 4, floor, ceiling) == ceiling, "unknown work gets the full budget"
    assert autotune.timing_budget(0.5, 4, floor, ceiling) == floor
    assert autotune.timing_budget(1000.0, 4, floor, ceiling) == ceiling
    assert autotune.timing_budget(8.0, 4, floor, ceiling) == pytest.approx(autotune.TUNE_SHARE * 8.0 / 4)


def test_autotune_times_again_for_larger_plans(tmp_path):
    model = create_model("shallow_cnn_w8")
    path = tmp_path / "autotune.json"
    args = dict(model=model, input_shape=(3, 32, 32), batch_size=64, precision="fp32", device="cpu",
                options=ExecutionOptions(compile="off"), cache=path)

    def timed_s(result):
        return json.loads(path.read_text())[result.key]["timed_s"]

    small = autotune.tune_module(planned_steps=10, **args)
    assert small.source == "measured"
    assert set(timed_s(small).values()) == {autotune.MIN_BUDGET_S}, "10 steps get the shortest timing"
    assert autotune.tune_module(planned_steps=10, **args).source == "cache"

    large = autotune.tune_module(planned_steps=10**6, **args)
    assert large.source == "measured", "a short cached timing is not trusted for a large plan"
    assert set(timed_s(large).values()) == {autotune.BUDGET_S}
    assert autotune.tune_module(planned_steps=10, **args).source == "cache"


W8_KEY = autotune.cache_key("shallow_cnn_w8", (3, 32, 32), 64, "fp32", torch.device("cpu"))


def _eager_labels():
    return [autotune.Candidate(layout, "off", n).label
            for layout in (False, True) for n in autotune.thread_counts(torch.device("cpu"))]


def _tune_w8(path, planned_steps):
    """Tune shallow_cnn_w8 eager at batch 64 against the cache file ``path``."""
    return autotune.tune_module(
        create_model("shallow_cnn_w8"), (3, 32, 32), 64, "fp32", "cpu", ExecutionOptions(compile="off"),
        planned_steps=planned_steps, name="shallow_cnn_w8", cache=path,
    )


def test_autotune_trusts_cache_without_timing_record(tmp_path):
    # Entries written before timings were recorded were timed for the full budget.
    autotune.save_entry(tmp_path / "a.json", W8_KEY, {"images_per_s": dict.fromkeys(_eager_labels(), 1000.0)})
    assert _tune_w8(tmp_path / "a.json", planned_steps=10**6).source == "cache"


@pytest.mark.parametrize("timed_s", ["garbage", {"any": "garbage"}, {"any": -1.0}, [0.3]])
def test_autotune_times_again_after_malformed_record(tmp_path, timed_s):
    labels = _eager_labels()
    if isinstance(timed_s, dict):
        timed_s = {label: next(iter(timed_s.values())) for label in labels}
    path = tmp_path / "a.json"
    autotune.save_entry(path, W8_KEY, {"images_per_s": dict.fromkeys(labels, 1000.0), "timed_s": timed_s})
    result = _tune_w8(path, planned_steps=10)
    assert result.source == "measured"
    assert set(json.loads(path.read_text())[W8_KEY]["timed_s"].values()) == {autotune.MIN_BUDGET_S}


def _cached_speeds(path, speeds):
    """Write a cache entry for shallow_cnn_w8 with the given speeds, timed for the full budget."""
    autotune.save_entry(path, W8_KEY, {"images_per_s": speeds, "timed_s": dict.fromkeys(speeds, autotune.BUDGET_S)})


def test_autotune_times_again_after_nan_speed(tmp_path):
    labels = _eager_labels()
    _cached_speeds(tmp_path / "a.json", {**dict.fromkeys(labels, 1000.0), labels[0]: float("nan")})
    result = _tune_w8(tmp_path / "a.json", planned_steps=10)
    assert result.source == "measured"
    assert all(speed > 0 for speed in result.images_per_s.values())


@pytest.mark.parametrize("planned_steps", [0, -5])
def test_autotune_unknown_work_takes_fastest(tmp_path, planned_steps):
    labels = _eager_labels()
    speeds = {label: 1000.0 + 10 * i for i, label in enumerate(labels)}
    _cached_speeds(tmp_path / "a.json", speeds)
    result = _tune_w8(tmp_path / "a.json", planned_steps)
    assert result.source == "cache"
    assert result.chosen.label == labels[-1]


def test_timing_under_load_warned(tmp_path, caplog):
    one_thread, two_threads = autotune.Candidate(True, "off", 1), autotune.Candidate(True, "off", 2)
    with caplog.at_level(logging.WARNING, logger="engine.training.autotune"):
        fast = {one_thread.label: 18000.0, two_threads.label: 25000.0}
        autotune._warn_if_timed_under_load(fast, [one_thread, two_threads], "w16", tmp_path)
        assert not caplog.records, "2 threads faster than 1 is no sign of load"
        stalled = {one_thread.label: 18000.0, two_threads.label: 500.0}
        autotune._warn_if_timed_under_load(stalled, [one_thread, two_threads], "w16", tmp_path)
    assert "2 threads timed 500 images/s against 18000 for 1 thread" in caplog.text
    assert f"delete {tmp_path} to time again" in caplog.text


def test_tune_includes_group_choice(tmp_path):
    result = autotune.tune(
        "mlp_d1_h64", CIFAR10, TrainConfig(max_epochs=2), n_train=256, n_jobs=4, device="cpu",
        options=ExecutionOptions(), cache=tmp_path / "a.json",
    )
    assert result.group is not None
    assert result.group.group_size in (1, 2, 4)
    record = json.loads(json.dumps(result.to_dict()))
    assert record["group"]["model"] == "mlp_d1_h64"
    assert record["chosen"] == result.chosen.label


def test_train_network_records_autotune(small, tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "a.json"))
    _, outcome = trained(small, ExecutionOptions(), max_epochs=1)
    tuning = outcome.execution["tuning"]
    assert tuning["source"] == "measured"
    assert outcome.execution["threads"] in autotune.thread_counts(torch.device("cpu"))
    assert tuning["chosen"] in tuning["images_per_s"]


def learnability(cifar, seed: int, precision: str, max_epochs: int) -> float:
    """Train N1 on D1 and N2 on N1's labels of D2; return their agreement on D3 in percent."""
    split = make_split(cifar, seed, subset=200)
    config = TrainConfig(max_epochs=max_epochs, precision=precision)
    options = ExecutionOptions(autotune=False, threads=1)
    torch.manual_seed(seed)
    n1 = create_model("shallow_cnn_w16")
    train_network(n1, *n1_training_set(cifar, split, "true_data"), config, seed, execution=options)
    d2 = cifar.train_images[torch.from_numpy(split.d2)]
    labels = torch.from_numpy(predict(n1, d2, precision=precision).astype(np.int64))
    torch.manual_seed(seed + 1000)
    n2 = create_model("shallow_cnn_w16")
    train_network(n2, d2, labels, config, seed + 1000, execution=options)
    d3 = cifar.test_images[torch.from_numpy(split.d3)]
    return 100.0 * float((predict(n1, d3, precision=precision) == predict(n2, d3, precision=precision)).mean())


@pytest.mark.slow
def test_bf16_learnability_within_seed_noise(cifar):
    seeds = (0, 1, 2)
    fp32 = np.array([learnability(cifar, seed, "fp32", 40) for seed in seeds])
    bf16 = np.array([learnability(cifar, seed, "bf16", 40) for seed in seeds])
    seed_noise = fp32.std(ddof=1)
    difference = abs(bf16.mean() - fp32.mean())
    # Same seeds: same initializations, splits and orders, so only the arithmetic
    # differs. The mean must move by less than the spread between seeds (at least
    # 3 points: with 3 seeds and 200 test images, 1 image is 0.5 points).
    assert difference <= max(seed_noise, 3.0), (
        f"bf16 learnability {bf16.round(1)} vs fp32 {fp32.round(1)}: mean differs by "
        f"{difference:.1f} points, seed std {seed_noise:.1f}"
    )


def test_tune_skips_group_sizes_for_tiny_work(tmp_path):
    # Two epochs of 128 images for 4 jobs: a few seconds of work cannot repay measuring group sizes.
    result = autotune.tune(
        "shallow_cnn_w16", CIFAR10, TrainConfig(max_epochs=2), n_train=128, n_jobs=4, device="cpu",
        options=ExecutionOptions(), cache=tmp_path / "a.json",
    )
    assert result.group.group_size == 1
    assert result.group.reason == "planned work too small to repay measuring group sizes"
    large = autotune.too_small_to_measure_groups(dataclasses.replace(result, planned_steps=10**6), 64)
    assert not large
