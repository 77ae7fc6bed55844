"""The fused pool_relu kernel against torch.relu(F.max_pool2d(x, 2)), bit for bit."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.models import CIFAR10
from engine.models.pooling import pool_relu
from engine.models.shallow import ShallowCNN
from kernels import max_pool2x2_relu, max_pool2x2_relu_backward

NAN = float("nan")
INF = float("inf")

FUSED_BACKWARD = "_PoolReLUBackward"


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def run_both(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Return output, input gradient and grad_fn name of pool_relu, then output and gradient of torch."""
    fused_in = x.detach().clone().requires_grad_()
    fused_out = pool_relu(fused_in)
    fused_out.backward(grad)

    torch_in = x.detach().clone().requires_grad_()
    torch_out = torch.relu(F.max_pool2d(torch_in, 2))
    torch_out.backward(grad)
    return fused_out, fused_in.grad, type(fused_out.grad_fn).__name__, torch_out, torch_in.grad


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Return whether two float32 tensors have equal shapes and bit patterns (NaN payloads, -0.0)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def assert_matches_torch(x: torch.Tensor, grad: torch.Tensor | None = None) -> None:
    if grad is None:
        grad = torch.randn(x.shape[0], x.shape[1], x.shape[2] // 2, x.shape[3] // 2)
    out, x_grad, backward, expected_out, expected_grad = run_both(x, grad)

    assert backward == FUSED_BACKWARD, f"expected the fused kernel, got {backward}"
    assert torch.equal(out, expected_out), "outputs differ"
    assert torch.equal(x_grad, expected_grad), "input gradients differ"
    assert same_bits(out, expected_out), "output bit patterns differ"
    assert same_bits(x_grad, expected_grad), "input gradient bit patterns differ"
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert x_grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 2, 2), (1, 3, 4, 6), (2, 3, 8, 8), (3, 16, 6, 4), (2, 64, 8, 8), (1, 64, 32, 32)],
)
def test_random_normal_matches_torch(shape):
    torch.manual_seed(0)
    assert_matches_torch(channels_last(torch.randn(shape)))


def test_small_integer_ties_match_torch():
    torch.manual_seed(1)
    x = torch.randint(-2, 3, (4, 16, 8, 8)).float()
    assert_matches_torch(channels_last(x))


@pytest.mark.parametrize("value", [1.0, 0.0, -0.0, -1.0, INF, -INF])
def test_all_equal_windows_match_torch(value):
    assert_matches_torch(channels_last(torch.full((2, 3, 4, 4), value)))


def test_constant_regions_match_torch():
    torch.manual_seed(2)
    x = torch.randn(2, 16, 8, 8)
    x[:, :, :4, :4] = 0.5
    x[:, :, 4:, :4] = 0.0
    x[:, :, :4, 4:] = -0.0
    x[:, :8, 4:, 4:] = -3.0
    assert_matches_torch(channels_last(x))


def test_nonpositive_windows_block_gradient():
    # Windows of only negative values, zeros of both signs and -inf: ReLU outputs 0
    # or -0.0 and passes no gradient. The -0.0 output gradients check the sign of the
    # zeros written to the input gradient.
    x = torch.tensor([[-1.0, -2.0, 0.0, -0.0, -INF, -INF, -0.0, -5.0],
                      [-3.0, -1.0, -0.0, 0.0, -INF, -1.0, -0.0, -0.0]])
    grad = torch.tensor([1.0, -0.0, 2.0, -0.0])
    x = channels_last(x.reshape(1, 1, 2, 8).repeat(2, 3, 1, 1))
    grad = grad.reshape(1, 1, 1, 4).repeat(2, 3, 1, 1)
    out, x_grad, _, expected_out, expected_grad = run_both(x, grad)

    assert same_bits(out, expected_out), "output bit patterns differ"
    assert same_bits(x_grad, expected_grad), "input gradient bit patterns differ"
    assert not x_grad.any(), "a gradient passed a non-positive output"


def test_negative_zero_gradient_becomes_positive_zero():
    x = channels_last(torch.ones(1, 2, 2, 2))
    grad = torch.full((1, 2, 1, 1), -0.0)
    _, x_grad, _, _, expected_grad = run_both(x, grad)
    assert same_bits(x_grad, expected_grad), "input gradient bit patterns differ"


def test_nan_windows_match_torch():
    # The last NaN of a window is the maximum, and the ReLU passes its gradient.
    torch.manual_seed(3)
    x = torch.randn(2, 16, 8, 8)
    x[torch.rand(x.shape) < 0.15] = NAN
    x[0, :, 0:2, 0:2] = NAN
    x[0, :, 0, 2], x[0, :, 1, 3] = NAN, INF
    x[1, :, 0, 0], x[1, :, 1, 1] = -1.0, NAN
    x = channels_last(x)
    grad = torch.randn(2, 16, 4, 4)
    out, x_grad, backward, expected_out, expected_grad = run_both(x, grad)

    assert backward == FUSED_BACKWARD, f"expected the fused kernel, got {backward}"
    torch.testing.assert_close(out, expected_out, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(x_grad, expected_grad, equal_nan=True, rtol=0, atol=0)
    assert same_bits(out, expected_out), "output bit patterns differ"
    assert same_bits(x_grad, expected_grad), "input gradient bit patterns differ"


@pytest.mark.parametrize(
    "make_input",
    [
        pytest.param(lambda: torch.randn(2, 3, 8, 8), id="nchw"),
        pytest.param(lambda: channels_last(torch.randn(2, 3, 8, 8, dtype=torch.float64)), id="float64"),
        pytest.param(lambda: channels_last(torch.randn(2, 3, 7, 9)), id="odd-size"),
        pytest.param(lambda: torch.randn(3, 8, 8), id="3d"),
    ],
)
def test_unsupported_inputs_fall_back_to_torch(make_input):
    torch.manual_seed(4)
    x = make_input()
    grad = torch.randn_like(torch.relu(F.max_pool2d(x, 2)))
    out, x_grad, backward, expected_out, expected_grad = run_both(x, grad)

    assert backward == "ReluBackward0"
    assert torch.equal(out, expected_out), "outputs differ"
    assert torch.equal(x_grad, expected_grad), "input gradients differ"


@pytest.mark.parametrize("shape", [(2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)])
def test_empty_channels_or_pixels_raise_like_torch(shape):
    x = channels_last(torch.empty(shape))
    with pytest.raises(RuntimeError, match="Expected 3D or 4D"):
        F.max_pool2d(x, 2)
    with pytest.raises(RuntimeError, match="Expected 3D or 4D"):
        pool_relu(x)


def test_empty_batch_matches_torch():
    x = channels_last(torch.empty(0, 3, 4, 4))
    out = pool_relu(x)
    assert out.shape == (0, 3, 2, 2)
    assert out.shape == torch.relu(F.max_pool2d(x, 2)).shape


def test_no_grad_call_matches_torch():
    torch.manual_seed(5)
    x = channels_last(torch.randn(2, 16, 4, 4))
    with torch.no_grad():
        out = pool_relu(x)
    assert torch.equal(out, torch.relu(F.max_pool2d(x, 2)))


def test_kernel_rejects_invalid_arrays():
    with pytest.raises(ValueError, match="even H and W"):
        max_pool2x2_relu(np.zeros((1, 3, 4, 2), np.float32))
    with pytest.raises(ValueError, match="float32"):
        max_pool2x2_relu(np.zeros((1, 4, 4, 2), np.float64))
    with pytest.raises(ValueError, match="same 4-D shape"):
        max_pool2x2_relu_backward(np.zeros((1, 2, 2, 3), np.float32), np.zeros((1, 2, 2, 2), np.uint8))


def test_shallow_cnn_channels_last_step_matches_nchw():
    torch.manual_seed(6)
    nchw = ShallowCNN(16, CIFAR10)
    fused = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    labels = torch.randint(0, 10, (8,))

    losses = []
    for model, x in [(nchw, images), (fused, channels_last(images))]:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        losses.append(loss.detach())
        optimizer.step()
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)

    expected = dict(nchw.named_parameters())
    assert list(expected) == [name for name, _ in fused.named_parameters()]
    for name, param in fused.named_parameters():
        torch.testing.assert_close(param.grad, expected[name].grad, rtol=0, atol=1e-5, msg=f"gradient of {name}")
        torch.testing.assert_close(param, expected[name], rtol=0, atol=1e-5, msg=f"{name} after the step")


def test_shallow_cnn_nhwc_flatten_matches_fc():
    torch.manual_seed(7)
    model = ShallowCNN(16, CIFAR10).to(memory_format=torch.channels_last)
    x = channels_last(torch.rand(4, 3, 32, 32) * 2 - 1)
    with torch.no_grad():
        pooled = pool_relu(model.conv(x))
        expected = model.fc(torch.flatten(pooled, 1))
        logits = model(x)
    assert (logits - expected).abs().max() < 1e-5
    assert "MaxPool2d" in repr(model)
    assert list(model.state_dict()) == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]


def test_concurrent_threads_match_torch():
    torch.manual_seed(8)
    inputs = [channels_last(torch.randn(4, 16, 16, 16)) for _ in range(2)]
    grads = [torch.randn(4, 16, 8, 8) for _ in range(2)]
    results: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
    start = threading.Barrier(2)

    def work(k: int) -> None:
        start.wait()
        for _ in range(20):
            x = inputs[k].clone().requires_grad_()
            out = pool_relu(x)
            out.backward(grads[k])
            results[k].append((out.detach(), x.grad))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for k in range(2):
        x = inputs[k].clone().requires_grad_()
        expected_out = torch.relu(F.max_pool2d(x, 2))
        expected_out.backward(grads[k])
        assert len(results[k]) == 20, f"thread {k} did not finish"
        for out, x_grad in results[k]:
            assert torch.equal(out, expected_out), f"output of thread {k} differs"
            assert torch.equal(x_grad, x.grad), f"input gradient of thread {k} differs"


def test_torch_func_transforms_fall_back():
    x = torch.randn(3, 2, 4, 8, 8).contiguous()
    batched = torch.func.vmap(pool_relu)(x)
    assert torch.equal(batched, torch.relu(F.max_pool2d(x.flatten(0, 1), 2)).view(3, 2, 4, 4, 4))
    image = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    gradient = torch.func.grad(lambda t: pool_relu(t).sum())(image)
    expected = torch.func.grad(lambda t: torch.relu(F.max_pool2d(t, 2)).sum())(image)
    assert torch.equal(gradient, expected)
