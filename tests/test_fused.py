"""Fused training against the one-network reference: modules, SGD, group training, strategy.

Each fused member must behave as the ordinary model trained alone: same outputs and
gradients, same SGD trajectory, and (on real data) the same training errors,
schedule and predictions as ``run_job``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.data.datasets import DATA_DIR_ENV
from engine.experiments.dispatch import run_jobs
from engine.experiments.jobs import DataContext, run_job
from engine.experiments.plan import NetworkJob
from engine.fused import (
    FusedMLP,
    FusedOptions,
    FusedSGD,
    FusedShallowCNN,
    choose_group_size,
    clear_cache,
    fuse_members,
    fused_train_step,
    strategy,
    train_group,
    trainer,
)
from engine.models import CIFAR10, MNIST
from engine.models.registry import InputSpec
from engine.models.shallow import MLP, ShallowCNN
from engine.training.config import TrainConfig
from engine.training.execution import ExecutionOptions

CPU = torch.device("cpu")
SUBSET = 200  # images per split in the real-data tests: 4 minibatches of 64 per epoch


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not (path / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 not found in {path}; set ${DATA_DIR_ENV} to a folder holding cifar-10-batches-py")
    return path


@pytest.fixture(scope="module")
def cifar(data_dir: Path) -> DataContext:
    return DataContext("cifar10", str(data_dir))


def _make_members(family: str, spec: InputSpec, count: int) -> list[nn.Module]:
    torch.manual_seed(1234)
    if family == "cnn":
        return [ShallowCNN(4, spec) for _ in range(count)]
    return [MLP(2, 8, spec) for _ in range(count)]


def _member_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    groups, batch = labels.shape
    losses = F.cross_entropy(logits.reshape(groups * batch, -1), labels.reshape(-1), reduction="none")
    return losses.view(groups, batch).mean(1).sum()


def _grads_as_member(fused, g: int) -> dict[str, torch.Tensor]:
    """Return member g's gradients in the ordinary module's layout (names and shapes)."""
    holder = fused.empty_like(fused.group_size)
    with torch.no_grad():
        for target, source in zip(holder.parameters(), fused.parameters()):
            target.copy_(source.grad)
    return dict(holder.member(g).named_parameters())


def _assert_same_weights(actual: nn.Module, expected: nn.Module, rtol: float = 0.0, atol: float = 0.0) -> None:
    expected_params = dict(expected.named_parameters())
    for name, value in actual.named_parameters():
        torch.testing.assert_close(value, expected_params[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


FAMILIES = [
    pytest.param("cnn", CIFAR10, False, id="cnn-cifar"),
    pytest.param("cnn", CIFAR10, True, id="cnn-cifar-channels_last"),
    pytest.param("cnn", MNIST, False, id="cnn-mnist"),
    pytest.param("cnn", MNIST, True, id="cnn-mnist-channels_last"),
    pytest.param("mlp", CIFAR10, False, id="mlp-cifar"),
    pytest.param("mlp", MNIST, False, id="mlp-mnist"),
]


@pytest.mark.parametrize("family, spec, channels_last", FAMILIES)
def test_member_outputs_and_gradients(family: str, spec: InputSpec, channels_last: bool) -> None:
    groups, batch = 3, 6
    members = _make_members(family, spec, groups)
    fused = fuse_members(members, spec)
    fused.channels_last = channels_last
    x = torch.randn(groups, batch, spec.channels, spec.height, spec.width)
    y = torch.randint(spec.num_classes, (groups, batch))

    logits = fused(x)
    _member_loss_sum(logits, y).backward()
    assert logits.shape == (groups, batch, spec.num_classes)
    for g, member in enumerate(members):
        expected = member(x[g])
        F.cross_entropy(expected, y[g]).backward()
        torch.testing.assert_close(
            logits[g], expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"member {g} logits: {m}"
        )
        grads = _grads_as_member(fused, g)
        for name, param in member.named_parameters():
            torch.testing.assert_close(
                grads[name], param.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"member {g} grad of {name}: {m}"
            )


@pytest.mark.parametrize("family, spec, channels_last", FAMILIES)
def test_shared_forward_matches_members(family: str, spec: InputSpec, channels_last: bool) -> None:
    members = _make_members(family, spec, 4)
    fused = fuse_members(members, spec)
    fused.channels_last = channels_last
    x = torch.randn(5, spec.channels, spec.height, spec.width)
    logits = fused.forward_shared(x)
    for g, member in enumerate(members):
        torch.testing.assert_close(logits[g], member(x), rtol=1e-5, atol=1e-6, msg=lambda m: f"member {g}: {m}")


@pytest.mark.parametrize("family, spec", [("cnn", CIFAR10), ("cnn", MNIST), ("mlp", CIFAR10), ("mlp", MNIST)])
def test_member_round_trip_is_exact(family: str, spec: InputSpec) -> None:
    members = _make_members(family, spec, 3)
    fused = fuse_members(members, spec)
    rng_before = torch.get_rng_state()
    for g, member in enumerate(members):
        copy = fused.member(g)
        assert type(copy) is type(member)
        _assert_same_weights(copy, member)
    assert torch.equal(torch.get_rng_state(), rng_before), "member() drew from the global RNG"

    replacement = _make_members(family, spec, 1)[0]
    for p in replacement.parameters():
        p.data.add_(1.0)
    fused.load_member(1, replacement)
    _assert_same_weights(fused.member(1), replacement)
    _assert_same_weights(fused.member(0), members[0])
    _assert_same_weights(fused.member(2), members[2])


def test_load_member_rejects_other_architecture() -> None:
    fused = FusedShallowCNN(2, 4, CIFAR10)
    with pytest.raises(TypeError, match="ShallowCNN of width 4"):
        fused.load_member(0, ShallowCNN(8, CIFAR10))
    with pytest.raises(TypeError, match="MLP of depth 1"):
        FusedMLP(2, 1, 8, CIFAR10).load_member(0, MLP(2, 8, CIFAR10))
    with pytest.raises(IndexError, match="out of range"):
        fused.member(2)


def test_default_initialization_matches_separate_models() -> None:
    torch.manual_seed(7)
    fused = FusedShallowCNN(3, 4, CIFAR10)
    torch.manual_seed(7)
    separate = [ShallowCNN(4, CIFAR10) for _ in range(3)]
    for g, member in enumerate(separate):
        _assert_same_weights(fused.member(g), member)


def test_select_copies_members_exactly() -> None:
    members = _make_members("cnn", CIFAR10, 5)
    fused = fuse_members(members, CIFAR10)
    fused.channels_last = True
    picked = fused.select([3, 0, 4])
    assert picked.group_size == 3
    assert picked.channels_last
    for slot, g in enumerate([3, 0, 4]):
        _assert_same_weights(picked.member(slot), members[g])
    for after, before in zip(picked.parameters(), fused.parameters()):
        assert torch.equal(after, before[[3, 0, 4]])


SGD_SETTINGS = [
    pytest.param([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], id="plain"),
    pytest.param([0.9, 0.0, 0.5], [5e-4, 1e-3, 0.0], id="momentum-weight_decay"),
]


@pytest.mark.parametrize("momentum, weight_decay", SGD_SETTINGS)
@pytest.mark.parametrize("family", ["cnn", "mlp"])
def test_fused_sgd_tracks_torch_sgd(family: str, momentum: list[float], weight_decay: list[float]) -> None:
    groups, batch, steps = 3, 8, 4
    lrs = [0.05, 0.01, 0.2]
    members = _make_members(family, CIFAR10, groups)
    fused = fuse_members(members, CIFAR10)
    fused_optimizer = FusedSGD(list(fused.parameters()), lrs, momentum, weight_decay)
    optimizers = [
        torch.optim.SGD(m.parameters(), lr=lr, momentum=mom, weight_decay=wd)
        for m, lr, mom, wd in zip(members, lrs, momentum, weight_decay)
    ]
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.rand(groups, batch, 3, 32, 32, generator=generator) * 2 - 1
        y = torch.randint(10, (groups, batch), generator=generator)
        loss, mistakes = fused_train_step(fused, fused_optimizer, x, y, shared_input=False)
        for g, (member, optimizer) in enumerate(zip(members, optimizers)):
            logits = member(x[g])
            expected = F.cross_entropy(logits, y[g])
            optimizer.zero_grad()
            expected.backward()
            optimizer.step()
            torch.testing.assert_close(loss[g], expected.detach(), rtol=1e-5, atol=1e-6)
            assert mistakes[g] == (logits.argmax(1) != y[g]).sum()
    for g, member in enumerate(members):
        _assert_same_weights(fused.member(g), member, rtol=1e-5, atol=1e-6)


def test_fused_sgd_zero_lr_freezes_member() -> None:
    fused = fuse_members(_make_members("mlp", CIFAR10, 2), CIFAR10)
    before = fused.member(1)
    optimizer = FusedSGD(list(fused.parameters()), [0.1, 0.0], momentum=[0.9, 0.9])
    for _ in range(3):
        x = torch.randn(2, 8, 3, 32, 32)
        fused_train_step(fused, optimizer, x, torch.randint(10, (2, 8)), shared_input=False)
    _assert_same_weights(fused.member(1), before)


def test_fused_sgd_select_keeps_state() -> None:
    fused = fuse_members(_make_members("mlp", CIFAR10, 3), CIFAR10)
    optimizer = FusedSGD(list(fused.parameters()), [0.1, 0.2, 0.3], momentum=[0.9, 0.8, 0.7])
    fused_train_step(fused, optimizer, torch.randn(3, 4, 3, 32, 32), torch.randint(10, (3, 4)), shared_input=False)
    picked = fused.select([2, 0])
    picked_optimizer = optimizer.select([2, 0], list(picked.parameters()))
    assert picked_optimizer.lr.tolist() == pytest.approx([0.3, 0.1])
    assert picked_optimizer.momentum.tolist() == pytest.approx([0.7, 0.9])
    for after, before in zip(picked_optimizer.buffers, optimizer.buffers):
        assert torch.equal(after, before[[2, 0]])


def _n1_jobs(
    model: str,
    config: TrainConfig,
    seeds: tuple[int, ...] = (0, 1),
    regimes: tuple[str, ...] = ("true_data", "random_labels", "random_images"),
) -> list[NetworkJob]:
    return [NetworkJob("n1", model, "cifar10", seed, SUBSET, regime, config) for seed in seeds for regime in regimes]


def _assert_matches_run_job(
    job: NetworkJob, record: dict, predictions: dict, data: DataContext, parent_d2: np.ndarray | None = None
) -> None:
    """Compare a fused member's record and predictions with ``run_job`` of the same job.

    On a 2-core AVX-512 CPU they were identical (training errors and every prediction).
    The tolerance leaves room for other CPUs, whose convolution kernels may round
    differently in the grouped or channels_last layout: 2 images of the subset per
    epoch's training error, 1% of the predictions.
    """
    expected_record, expected_predictions = run_job(job, data, CPU, parent_d2)
    description = job.describe()
    assert record["status"] == expected_record["status"], description
    assert record["epochs"] == expected_record["epochs"], description
    assert record["stop_reason"] == expected_record["stop_reason"], description
    assert record["lr_drops"] == expected_record["lr_drops"], description
    np.testing.assert_allclose(
        record["train_errors"], expected_record["train_errors"], atol=2 / SUBSET, err_msg=description
    )
    assert record["trainer"].startswith("fused G="), description
    for split in ("d2", "d3"):
        agreement = (predictions[split] == expected_predictions[split]).mean()
        assert agreement >= 0.99, f"{description}: {split} predictions agree on {agreement:.3f}"
        assert np.array_equal(predictions[f"{split}_labels"], expected_predictions[f"{split}_labels"])


@pytest.mark.parametrize("model", ["shallow_cnn_w8", "mlp_d2_h16"])
def test_train_group_matches_run_job(cifar: DataContext, model: str) -> None:
    config = TrainConfig(max_epochs=2, plateau_epochs=1)
    n1_jobs = _n1_jobs(model, config, seeds=(0,))
    n1_results = {job.key: (record, predictions) for job, record, predictions in train_group(n1_jobs, cifar, CPU)}
    assert set(n1_results) == {job.key for job in n1_jobs}
    for job in n1_jobs:
        _assert_matches_run_job(job, *n1_results[job.key], cifar)

    # N2 members learn from different N1s: each trains on its own parent's labels.
    n2_config = TrainConfig(max_epochs=1)
    n2_jobs = [NetworkJob("n2", model, "cifar10", 0, SUBSET, j.regime, n2_config, parent=j.key) for j in n1_jobs]
    parent_d2 = {job.key: n1_results[job.parent][1]["d2"] for job in n2_jobs}
    for job, record, predictions in train_group(n2_jobs, cifar, CPU, parent_d2):
        _assert_matches_run_job(job, record, predictions, cifar, parent_d2[job.key])


def test_members_stop_and_drop_lr_independently(cifar: DataContext) -> None:
    configs = [
        TrainConfig(max_epochs=2, plateau_epochs=1),
        TrainConfig(max_epochs=4, plateau_epochs=1, lr=0.02),
        TrainConfig(max_epochs=3, lr=1e6),  # diverges in its first epoch
        TrainConfig(max_epochs=4, plateau_epochs=2, lr_drop_factor=2.0),
        TrainConfig(max_epochs=3, plateau_epochs=1, exact_train_error=True),
    ]
    jobs = [NetworkJob("n1", "shallow_cnn_w8", "cifar10", 0, SUBSET, "true_data", c) for c in configs]
    results = list(train_group(jobs, cifar, CPU, options=FusedOptions(repack_fraction=1.0)))

    finished = [job.train.max_epochs if job.train.lr < 1 else 1 for job, _, _ in results]
    assert finished == sorted(finished), "members were not yielded in the order they stopped"
    by_key = {job.key: (record, predictions) for job, record, predictions in results}
    diverged, diverged_predictions = by_key[jobs[2].key]
    assert diverged["status"] == "failed"
    assert diverged["stop_reason"] == "diverged"
    assert "non-finite loss in epoch 1" in diverged["failure"]
    assert diverged_predictions == {}
    drops = {}
    for job in (jobs[0], jobs[1], jobs[3], jobs[4]):
        record, predictions = by_key[job.key]
        assert record["status"] == "ok", record["failure"]
        assert record["epochs"] == job.train.max_epochs
        _assert_matches_run_job(job, record, predictions, cifar)
        drops[job.key] = record["lr_drops"]
    assert len({tuple(d) for d in drops.values()}) > 1, f"all members dropped their lr alike: {drops}"


def test_repack_continues_exactly(cifar: DataContext, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    configs = [TrainConfig(max_epochs=e, plateau_epochs=1) for e in (1, 3, 1, 3)]
    jobs = [
        NetworkJob("n1", "shallow_cnn_w8", "cifar10", 0, SUBSET, regime, c)
        for regime, c in zip(("true_data", "random_labels", "random_images", "true_data"), configs)
    ]
    final_weights: dict[tuple[float, str], nn.Module] = {}
    real_predictions_of = trainer.predictions_of

    def capture(model, job, data, device):
        final_weights[repack_fraction, job.key] = model
        return real_predictions_of(model, job, data, device)

    monkeypatch.setattr(trainer, "predictions_of", capture)
    records = {}
    for repack_fraction in (0.25, 1.0):
        with caplog.at_level(logging.DEBUG, logger="engine.fused.trainer"):
            caplog.clear()
            results = list(train_group(jobs, cifar, CPU, options=FusedOptions(repack_fraction=repack_fraction)))
        repacked = any("repacking a fused group from 4 to 2" in message for message in caplog.messages)
        assert repacked == (repack_fraction < 1.0)
        records[repack_fraction] = {job.key: (record, predictions) for job, record, predictions in results}

    for job in jobs:
        repacked_record, repacked_predictions = records[0.25][job.key]
        record, predictions = records[1.0][job.key]
        assert repacked_record["train_errors"] == record["train_errors"], job.describe()
        for split in ("d2", "d3"):
            assert np.array_equal(repacked_predictions[split], predictions[split]), job.describe()
        _assert_same_weights(final_weights[0.25, job.key], final_weights[1.0, job.key])


def test_shared_batches_first_member_matches_run_job(cifar: DataContext, caplog) -> None:
    jobs = _n1_jobs("shallow_cnn_w8", TrainConfig(max_epochs=2), seeds=(0,), regimes=("true_data", "random_labels"))
    with caplog.at_level(logging.INFO, logger="engine.fused.trainer"):
        results = list(train_group(jobs, cifar, CPU, options=FusedOptions(share_batches=True)))
    assert any("1 distinct training sets, shared batches" in message for message in caplog.messages)
    by_key = {job.key: (record, predictions) for job, record, predictions in results}
    assert all(record["status"] == "ok" for record, _ in by_key.values())
    assert all(record["trainer"] == "fused G=2 shared-batches" for record, _ in by_key.values())
    _assert_matches_run_job(jobs[0], *by_key[jobs[0].key], cifar)


def test_train_group_rejects_mixed_jobs(cifar: DataContext) -> None:
    config = TrainConfig(max_epochs=1)
    mixed_models = [
        NetworkJob("n1", "shallow_cnn_w8", "cifar10", 0, SUBSET, "true_data", config),
        NetworkJob("n1", "shallow_cnn_w16", "cifar10", 0, SUBSET, "true_data", config),
    ]
    with pytest.raises(ValueError, match="one model"):
        list(train_group(mixed_models, cifar, CPU))
    zoo = [NetworkJob("n1", "vgg11", "cifar10", s, SUBSET, "true_data", config) for s in (0, 1)]
    with pytest.raises(TypeError, match="no fused version"):
        list(train_group(zoo, cifar, CPU))


def test_run_jobs_groups_and_falls_back(cifar: DataContext) -> None:
    config = TrainConfig(max_epochs=1)
    jobs = _n1_jobs("mlp_d1_h8", config, seeds=(0,))
    choices = []
    results = list(run_jobs(jobs, cifar, CPU, options=FusedOptions(group_size=2), on_choice=choices.append))
    assert sorted(job.key for job, _, _ in results) == sorted(job.key for job in jobs)
    trainers = sorted(record["trainer"] for _, record, _ in results)
    assert trainers == ["fused G=2", "fused G=2", "single"], "3 jobs at G=2 should train as a pair and a single"
    assert [c.group_size for c in choices] == [2]
    assert choices[0].reason == "fixed"

    one_by_one = list(run_jobs(jobs[:2], cifar, CPU, options=FusedOptions(group_size=1)))
    assert [record["trainer"] for _, record, _ in one_by_one] == ["single", "single"]


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_groups_keep_given_layout(cifar: DataContext, channels_last: bool) -> None:
    jobs = _n1_jobs("shallow_cnn_w8", TrainConfig(max_epochs=1), seeds=(0,), regimes=("true_data", "random_labels"))
    execution = ExecutionOptions(channels_last=channels_last, compile="off", threads=2)
    results = list(run_jobs(jobs, cifar, CPU, options=FusedOptions(group_size=2), execution=execution))
    assert [record["trainer"] for _, record, _ in results] == ["fused G=2", "fused G=2"]
    assert all(record["execution"]["channels_last"] is channels_last for _, record, _ in results)


@pytest.fixture
def measured_sizes(monkeypatch: pytest.MonkeyPatch):
    """Yield the list of group sizes measured, in order, with the process cache cleared before and after."""
    clear_cache()
    calls: list[int] = []
    real_measure = strategy.measure_throughput

    def counting_measure(*args, **kwargs):
        calls.append(args[3])
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(strategy, "measure_throughput", counting_measure)
    yield calls
    clear_cache()


def test_choose_group_size_measures_and_caches(measured_sizes, caplog) -> None:
    calls = measured_sizes
    with caplog.at_level(logging.INFO, logger="engine.fused.strategy"):
        choice = choose_group_size("mlp_d1_h8", CIFAR10, 64, 5, CPU, candidates=(1, 4), budget_s=0.01)
    assert calls == [1, 4]
    assert set(choice.images_per_s) == {1, 4}
    assert all(v > 0 for v in choice.images_per_s.values())
    assert choice.group_size in (1, 4)
    assert choice.reason == "measured"
    assert any("group size for mlp_d1_h8" in message for message in caplog.messages)
    json.dumps(choice.to_dict())

    again = choose_group_size("mlp_d1_h8", CIFAR10, 64, 5, CPU, candidates=(1, 4), budget_s=0.01)
    assert calls == [1, 4], "a cached choice measured again"
    assert again.group_size == choice.group_size

    assert choose_group_size("vgg11", CIFAR10, 64, 10, CPU).reason == "not fusable"
    assert choose_group_size("mlp_d1_h8", CIFAR10, 64, 1, CPU).group_size == 1


def test_group_sizes_kept_in_cache_file(measured_sizes, tmp_path) -> None:
    calls = measured_sizes
    path = tmp_path / "autotune.json"
    args = ("mlp_d1_h8", CIFAR10, 64, 5, CPU)
    first = choose_group_size(*args, candidates=(1, 4), budget_s=0.01, cache=path)
    assert calls == [1, 4]
    (entry,) = json.loads(path.read_text()).values()
    assert set(entry["groups"]["independent"]) == {"1", "4"}

    clear_cache()  # a new process: only the file remembers
    again = choose_group_size(*args, candidates=(1, 4), budget_s=0.01, cache=path)
    assert calls == [1, 4], "group sizes in the cache file were measured again"
    assert again.images_per_s == pytest.approx(first.images_per_s)
    assert again.group_size == first.group_size

    choose_group_size(*args, candidates=(1, 4), budget_s=0.01, shared=True, cache=path)
    assert calls == [1, 4, 1, 4], "shared batches are a different measurement"
    (entry,) = json.loads(path.read_text()).values()
    assert set(entry["groups"]) == {"independent", "shared"}


def test_step_memory_estimate_grows_with_width() -> None:
    small = strategy.step_bytes_per_member("shallow_cnn_w16", CIFAR10, 64)
    large = strategy.step_bytes_per_member("shallow_cnn_w256", CIFAR10, 64)
    # The conv output of width 16 at batch 64 alone is 64*16*32*32 floats (4 MiB).
    assert small > 4 * 64 * 16 * 32 * 32
    assert 12 < large / small < 17


def test_fused_options_validate() -> None:
    with pytest.raises(ValueError, match="group_size"):
        FusedOptions(group_size=0)
    with pytest.raises(ValueError, match="repack_fraction"):
        FusedOptions(repack_fraction=0.0)
    assert FusedOptions().to_dict() == {
        "group_size": None, "share_batches": False, "repack_fraction": 0.25, "channels_last": None,
    }
