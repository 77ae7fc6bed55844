"""Fused 2x2 max pooling and ReLU on NHWC float32 arrays, forward and backward.

The results match ``torch.relu(F.max_pool2d(x, 2))`` of PyTorch's CPU kernels bit
for bit (checked against PyTorch 2.13), outputs and input gradients alike, NaN and
ties included:

- Max pooling (``cpu_max_pool_channels_last`` in ATen's MaxPoolKernel.cpp) scans a
  window in the order (0,0), (0,1), (1,0), (1,1), starting from -inf at position
  (0,0). An element becomes the maximum when ``val > max or isnan(val)``, so the
  first of equal maxima wins and the last NaN wins over everything.
- ReLU maps values below 0 to 0 and keeps NaN and -0.0. Its backward blocks the
  gradient where ``out <= 0``, so the gradient passes where the output is positive
  or NaN.
- The max-pooling backward adds the gradient to a zero-filled buffer, which turns a
  -0.0 gradient into +0.0.

The kernels are serial and release the GIL, so several Python threads can run them
at once. Parallel numba kernels would need a threadsafe threading layer.
"""

import numpy as np
import numpy.typing as npt
from numba import njit

# Value of `arg` for an output whose gradient is blocked by the ReLU.
NO_GRADIENT = 4


def max_pool2x2_relu(x: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    """Compute relu(2x2 max pooling) of an NHWC array and where its gradient goes.

    Args:
        x: float32 array [N, H, W, C] with even H and W. It is copied first unless
            it is C-contiguous.

    Returns:
        ``(out, arg)``: ``out`` is the float32 array [N, H/2, W/2, C] of window
        maxima passed through ReLU. ``arg`` is a uint8 array of the same shape that
        contains the position 2*dy + dx of the maximum inside its window where the
        gradient passes (output positive or NaN), and NO_GRADIENT (4) elsewhere.

    Raises:
        ValueError: If `x` is not a 4-D float32 array or H or W is odd.
    """
    x = np.asarray(x)
    if x.ndim != 4 or x.dtype != np.float32:
        raise ValueError(f"x must be a 4-D float32 array [N, H, W, C], got {x.ndim}-D {x.dtype}")
    n, height, width, channels = x.shape
    if height % 2 or width % 2:
        raise ValueError(f"x must have even H and W for 2x2 pooling, got {height}x{width}")

    x = np.ascontiguousarray(x)
    out = np.empty((n, height // 2, width // 2, channels), np.float32)
    arg = np.empty(out.shape, np.uint8)
    _pool_relu_forward(x, out, arg)
    return out, arg


def max_pool2x2_relu_backward(
    grad_out: npt.NDArray[np.float32],
    arg: npt.NDArray[np.uint8],
) -> npt.NDArray[np.float32]:
    """Compute the input gradient of `max_pool2x2_relu` from its output gradient.

    Args:
        grad_out: float32 array [N, H/2, W/2, C], the gradient of the output. It is
            copied first unless it is C-contiguous.
        arg: The uint8 array of the same shape that `max_pool2x2_relu` returned.

    Returns:
        The float32 gradient [N, H, W, C] of the input: ``grad_out + 0.0`` at the
        position that `arg` names in each window, 0 at the other positions.

    Raises:
        ValueError: If the dtypes are not float32 and uint8, or the shapes differ or
            are not 4-D.
    """
    grad_out = np.asarray(grad_out)
    arg = np.asarray(arg)
    if grad_out.dtype != np.float32 or arg.dtype != np.uint8:
        raise ValueError(f"grad_out must be float32 and arg uint8, got {grad_out.dtype} and {arg.dtype}")
    if grad_out.ndim != 4 or grad_out.shape != arg.shape:
        raise ValueError(
            f"grad_out and arg must have the same 4-D shape [N, H/2, W/2, C], got {grad_out.shape} and {arg.shape}"
        )

    grad_out = np.ascontiguousarray(grad_out)
    arg = np.ascontiguousarray(arg)
    n, out_height, out_width, channels = grad_out.shape
    grad_in = np.empty((n, 2 * out_height, 2 * out_width, channels), np.float32)
    _pool_relu_backward(grad_out, arg, grad_in)
    return grad_in


@njit(cache=True, nogil=True)
def _pool_relu_forward(
    x: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    arg: npt.NDArray[np.uint8],
) -> None:
    n, out_height, out_width, channels = out.shape
    zero = np.float32(0.0)
    for b in range(n):
        for i in range(out_height):
            for j in range(out_width):
                # Branch-free selects over contiguous channels, so LLVM vectorizes
                # the loop. The first element needs no test: against the initial
                # -inf it wins unless it is -inf itself, and then the maximum is
                # -inf at position 0 either way.
                for c in range(channels):
                    top_left = x[b, 2 * i, 2 * j, c]
                    top_right = x[b, 2 * i, 2 * j + 1, c]
                    bottom_left = x[b, 2 * i + 1, 2 * j, c]
                    bottom_right = x[b, 2 * i + 1, 2 * j + 1, c]

                    maximum = top_left
                    position = 0
                    take = (top_right > maximum) | np.isnan(top_right)
                    maximum = top_right if take else maximum
                    position = 1 if take else position
                    take = (bottom_left > maximum) | np.isnan(bottom_left)
                    maximum = bottom_left if take else maximum
                    position = 2 if take else position
                    take = (bottom_right > maximum) | np.isnan(bottom_right)
                    maximum = bottom_right if take else maximum
                    position = 3 if take else position

                    out[b, i, j, c] = zero if maximum < zero else maximum
                    arg[b, i, j, c] = NO_GRADIENT if maximum <= zero else position


@njit(cache=True, nogil=True)
def _pool_relu_backward(
    grad_out: npt.NDArray[np.float32],
    arg: npt.NDArray[np.uint8],
    grad_in: npt.NDArray[np.float32],
) -> None:
    n, out_height, out_width, channels = grad_out.shape
    zero = np.float32(0.0)
    # Each input row is written in one sequential pass. Writing all four window
    # positions from one loop over channels, so two rows at once, vectorizes too but
    # took 2.0 ms instead of 0.45 ms for a [64, 32, 32, 64] input on one AMD EPYC core.
    for b in range(n):
        for i in range(out_height):
            for dy in range(2):
                for j in range(out_width):
                    for dx in range(2):
                        window_position = 2 * dy + dx
                        for c in range(channels):
                            # Adding +0.0 turns -0.0 into +0.0, as PyTorch's
                            # accumulation into a zero-filled gradient does.
                            grad = grad_out[b, i, j, c] + zero
                            routed = arg[b, i, j, c] == window_position
                            grad_in[b, 2 * i + dy, 2 * j + dx, c] = grad if routed else zero
