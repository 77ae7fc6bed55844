"""Parameter counts of the shallow CNN and MLP families against the study's formulas."""

import pytest
import torch

from engine.models import CIFAR10, MNIST, count_parameters, create_model, list_models
from engine.models.registry import register_model

SHALLOW_COUNTS = {16: 42_186, 32: 84_362, 64: 168_714, 128: 337_418, 256: 674_826, 512: 1_349_642, 1024: 2_699_274}


@pytest.mark.parametrize("width", sorted(SHALLOW_COUNTS))
def test_shallow_cnn_counts(width):
    _, params = count_parameters(create_model(f"shallow_cnn_w{width}"))
    assert params == SHALLOW_COUNTS[width]
    assert params == 3 * 25 * width + width + 2560 * width + 10


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_cifar_mlp_counts(depth):
    tensors, params = count_parameters(create_model(f"mlp_d{depth}_h64"))
    assert params == 197_322 + 4_160 * (depth - 1)
    assert tensors == 2 * (depth + 1)


@pytest.mark.parametrize("hidden", [1, 2, 3, 4, 5, 6])
def test_mnist_mlp_counts(hidden):
    _, params = count_parameters(create_model(f"mlp_d1_h{hidden}", MNIST))
    assert params == 795 * hidden + 10


def test_mnist_shallow_cnn_shape():
    model = create_model("shallow_cnn_w16", MNIST)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_unknown_model_names_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet9'.*shallow_cnn_w"):
        create_model("resnet9")


@pytest.mark.parametrize("name", ["shallow_cnn_w0", "mlp_d0_h64", "shallow_cnn_w", "mlp_d1"])
def test_malformed_family_names_rejected(name):
    with pytest.raises(ValueError, match="unknown model"):
        create_model(name)


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_model("vgg11")(lambda spec: None)


def test_list_models_filters():
    names = list_models("shallow_cnn_*")
    assert "shallow_cnn_w1024" in names
    assert all(n.startswith("shallow_cnn_") for n in names)
    assert "mlp_d3_h64" in list_models()
    assert create_model("shallow_cnn_w16", CIFAR10).fc.out_features == 10
