"""The shallow CNN and MLP families of the learnability study."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.pooling import pool_relu
from engine.models.registry import InputSpec, register_family

SHALLOW_WIDTHS = (16, 32, 64, 128, 256, 512, 1024)
MLP_DEPTHS = (1, 2, 3, 4, 5)


class ShallowCNN(nn.Module):
    """Conv2d(C, w, 5x5, padding 2) -> ReLU -> MaxPool 2x2 -> Linear(w*H/2*W/2, classes).

    Input ``[N, C, H, W]`` with even H and W; output logits ``[N, classes]``.
    """

    def __init__(self, width: int, spec: InputSpec) -> None:
        super().__init__()
        if spec.height % 2 or spec.width % 2:
            raise ValueError(f"shallow CNN needs even image sides, got {spec.height}x{spec.width}")
        self.width = width
        self.conv = nn.Conv2d(spec.channels, width, kernel_size=5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(width * (spec.height // 2) * (spec.width // 2), spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Max-pooling and ReLU commute (ReLU is monotonic), so pooling first gives the
        # same outputs and gradients with a quarter of the ReLU work. pool_relu gives
        # exactly torch.relu(self.pool(x)), fused into one kernel for channels_last
        # CPU tensors. self.pool stays as a submodule so the repr shows the layer.
        x = pool_relu(self.conv(x))

        if x.is_contiguous(memory_format=torch.channels_last):
            # Flatten in NHWC order, a free view of channels_last memory, and permute
            # the weight columns to match, instead of copying x to NCHW order. The
            # logits differ from self.fc(torch.flatten(x, 1)) by summation order only.
            n, channels, height, width = x.shape
            classes = self.fc.out_features
            weight = self.fc.weight.view(classes, channels, height, width).permute(0, 2, 3, 1)
            return F.linear(x.permute(0, 2, 3, 1).reshape(n, -1), weight.reshape(classes, -1), self.fc.bias)
        return self.fc(torch.flatten(x, 1))


class MLP(nn.Module):
    """Flatten -> ``depth`` blocks of Linear + ReLU of ``hidden`` units -> Linear to classes.

    Input ``[N, C, H, W]``; output logits ``[N, classes]``.
    """

    def __init__(self, depth: int, hidden: int, spec: InputSpec) -> None:
        super().__init__()
        if depth < 1 or hidden < 1:
            raise ValueError(f"MLP needs depth >= 1 and hidden >= 1, got {depth} and {hidden}")
        self.depth = depth
        self.hidden = hidden
        sizes = [spec.channels * spec.height * spec.width] + [hidden] * depth
        self.hidden_layers = nn.ModuleList(
            nn.Linear(sizes[i], sizes[i + 1]) for i in range(depth)
        )
        self.out = nn.Linear(hidden, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        for layer in self.hidden_layers:
            x = torch.relu(layer(x))
        return self.out(x)


@register_family(
    "shallow_cnn_w{width}",
    r"shallow_cnn_w(?P<width>[1-9][0-9]*)",
    tuple(f"shallow_cnn_w{w}" for w in SHALLOW_WIDTHS),
)
def shallow_cnn(width: int, spec: InputSpec) -> ShallowCNN:
    return ShallowCNN(width, spec)


@register_family(
    "mlp_d{depth}_h{hidden}",
    r"mlp_d(?P<depth>[1-9][0-9]*)_h(?P<hidden>[1-9][0-9]*)",
    tuple(f"mlp_d{d}_h64" for d in MLP_DEPTHS) + tuple(f"mlp_d1_h{h}" for h in range(1, 7)),
)
def mlp(depth: int, hidden: int, spec: InputSpec) -> MLP:
    return MLP(depth, hidden, spec)
