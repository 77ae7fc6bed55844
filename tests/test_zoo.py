"""Tests for the CIFAR model zoo: parameter counts against the published reference,
output shapes, and rejection of inputs that are not 3x32x32."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from engine.models import CIFAR10, CIFAR100, MNIST, count_parameters, create_model, list_models
from engine.models.zoo import ZOO_MODELS


def _bn(channels: int) -> int:
    # BatchNorm2d learns a weight and a bias per channel.
    return 2 * channels


def _conv3x3(in_channels: int, out_channels: int) -> int:
    return 9 * in_channels * out_channels


def _preact_block(in_channels: int, out_channels: int) -> tuple[int, int]:
    """Parameter tensors and parameters of one PreActBlock (bias-free convolutions).

    bn1 on the input, conv1 3x3, bn2, conv2 3x3, plus a 1x1 projection shortcut
    (no BatchNorm) when the channel count changes.
    """
    tensors = 2 + 1 + 2 + 1
    params = (
        _bn(in_channels)
        + _conv3x3(in_channels, out_channels)
        + _bn(out_channels)
        + _conv3x3(out_channels, out_channels)
    )
    if in_channels != out_channels:
        tensors += 1
        params += in_channels * out_channels
    return tensors, params


def _derive_preact_resnet18(num_classes: int) -> tuple[int, int]:
    """Count PreActResNet18 by hand: a bias-free 3x3 stem to 64 channels, two
    PreActBlocks per stage at 64, 128, 256 and 512 channels, and Linear(512, classes).
    There is no BatchNorm after the stem or before the pool."""
    stem = (1, _conv3x3(3, 64))
    blocks = [
        _preact_block(64, 64),  # 128 + 36,864 + 128 + 36,864 = 73,984
        _preact_block(64, 64),  # 73,984
        _preact_block(64, 128),  # 128 + 73,728 + 256 + 147,456 + 8,192 = 229,760
        _preact_block(128, 128),  # 256 + 147,456 + 256 + 147,456 = 295,424
        _preact_block(128, 256),  # 256 + 294,912 + 512 + 589,824 + 32,768 = 918,272
        _preact_block(256, 256),  # 512 + 589,824 + 512 + 589,824 = 1,180,672
        _preact_block(256, 512),  # 512 + 1,179,648 + 1,024 + 2,359,296 + 131,072 = 3,671,552
        _preact_block(512, 512),  # 1,024 + 2,359,296 + 1,024 + 2,359,296 = 4,720,640
    ]
    head = (2, 512 * num_classes + num_classes)
    parts = [stem, *blocks, head]
    return sum(t for t, _ in parts), sum(p for _, p in parts)


PREACT_RESNET18_REFERENCE = _derive_preact_resnet18(num_classes=10)

# (parameter tensors, parameters) at 10 classes, as published for the pytorch-cifar
# definitions. PreActResNet18 has no published count, so its entry is derived above.
REFERENCE_COUNTS: dict[str, tuple[int, int]] = {
    "vgg11": (34, 9_231_114),
    "vgg13": (42, 9_416_010),
    "vgg16": (54, 14_728_266),
    "vgg19": (66, 20_040_522),
    "resnet18": (62, 11_173_962),
    "resnet34": (110, 21_282_122),
    "preact_resnet18": PREACT_RESNET18_REFERENCE,
    "dpn26": (89, 11_574_842),
    "densenet121": (362, 6_956_298),
    "googlenet": (258, 6_166_250),
}


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    # A batch of two images gains nothing from intra-op threads, and on a loaded machine
    # the threads contend. One DenseNet121 forward took 8.5 s with 2 threads and 0.12 s
    # with 1 thread on a 2-core VM shared with other jobs.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=ZOO_MODELS)
def zoo_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, create_model(request.param, CIFAR10)


def test_zoo_table_covers_registry() -> None:
    assert sorted(REFERENCE_COUNTS) == sorted(ZOO_MODELS)
    registered = set(list_models())
    missing = [name for name in ZOO_MODELS if name not in registered]
    assert not missing, f"zoo models not registered: {missing}"


def test_preact_resnet18_derivation() -> None:
    tensors, params = PREACT_RESNET18_REFERENCE
    # 1 stem + 8 blocks x 6 + 3 projections + 2 linear.
    assert tensors == 54
    assert params == 11_171_146


def test_zoo_parameter_tensor_count(zoo_model: tuple[str, nn.Module]) -> None:
    name, model = zoo_model
    tensors, _ = count_parameters(model)
    expected, _ = REFERENCE_COUNTS[name]
    assert tensors == expected, f"{name}: {tensors} parameter tensors, reference {expected}"


def test_zoo_parameter_count(zoo_model: tuple[str, nn.Module]) -> None:
    name, model = zoo_model
    _, params = count_parameters(model)
    _, expected = REFERENCE_COUNTS[name]
    assert params == expected, f"{name}: {params:,} parameters, reference {expected:,}"


def test_zoo_forward_shape(zoo_model: tuple[str, nn.Module]) -> None:
    name, model = zoo_model
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10), f"{name}: logits shape {tuple(logits.shape)}"
    assert torch.isfinite(logits).all(), f"{name}: non-finite logits"


def test_zoo_cifar100_head() -> None:
    model = create_model("vgg11", CIFAR100).eval()
    assert model.classifier.out_features == 100
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100)


def test_preact_resnet18_cifar100_count() -> None:
    model = create_model("preact_resnet18", CIFAR100)
    assert count_parameters(model) == _derive_preact_resnet18(num_classes=100)


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_zoo_rejects_mnist(name: str) -> None:
    with pytest.raises(ValueError, match="3x32x32") as excinfo:
        create_model(name, MNIST)
    message = str(excinfo.value)
    assert name in message
    assert "1x28x28" in message
    assert "\n" not in message
