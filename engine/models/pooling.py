"""ReLU after 2x2 max pooling, fused into one numba kernel for channels_last CPU tensors.

PyTorch's max-pooling backward zero-fills the input gradient and then scatters into
it, and the ReLU adds two more passes. The fused kernel computes the pooled ReLU
output and a one-byte gradient route per output in one pass, and its backward writes
every input gradient element once. Forward plus backward of a channels_last batch
[64, 64, 32, 32] took 1.8 ms instead of 4.6 ms on one AMD EPYC core (PyTorch 2.13,
numba 0.68, best of 3 windows of 40 calls).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kernels import max_pool2x2_relu, max_pool2x2_relu_backward


class _PoolReLU(torch.autograd.Function):
    """``relu(max_pool2d(x, 2))`` of a channels_last float32 CPU tensor ``[N, C, H, W]``.

    The kernels work on the NHWC view ``x.permute(0, 2, 3, 1)``, which is contiguous
    for channels_last memory, and return NHWC arrays whose permuted views are again
    channels_last tensors: output ``[N, C, H/2, W/2]``, input gradient ``[N, C, H, W]``.
    The backward is not differentiable, so double backward raises.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out, arg = max_pool2x2_relu(x.detach().permute(0, 2, 3, 1).numpy())
        ctx.save_for_backward(torch.from_numpy(arg))
        return torch.from_numpy(out).permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor | None:
        if not ctx.needs_input_grad[0]:
            return None
        (arg,) = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_in = max_pool2x2_relu_backward(grad_out.permute(0, 2, 3, 1).numpy(), arg.numpy())
        return torch.from_numpy(grad_in).permute(0, 3, 1, 2)


def _fused_kernel_applies(x: torch.Tensor) -> bool:
    # Inputs with no channels or no pixels go to F.max_pool2d, which raises for them.
    # A torch.func transform comes first: is_contiguous raises inside vmap.
    return (
        not _functorch_active()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 4
        and min(x.shape[1:]) > 0
        and x.shape[2] % 2 == 0
        and x.shape[3] % 2 == 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and not torch.compiler.is_compiling()
    )


def _functorch_active() -> bool:
    """Return whether a torch.func transform (vmap, grad) is active: the autograd.Function has no rule for them."""
    active = getattr(torch._C._functorch, "are_transforms_active", None) or getattr(
        torch._C, "_are_functorch_transforms_active", None
    )
    return bool(active()) if active is not None else False


def pool_relu(x: torch.Tensor) -> torch.Tensor:
    """Compute ``torch.relu(F.max_pool2d(x, 2))`` with identical outputs and gradients.

    A float32 CPU tensor ``[N, C, H, W]`` in channels_last memory with even H and W
    goes through the fused kernel, and its output is channels_last as well. Any other
    input, and any call while ``torch.compile`` traces, uses the two PyTorch operators.
    """
    if _fused_kernel_applies(x):
        return _PoolReLU.apply(x)
    return torch.relu(F.max_pool2d(x, 2))
