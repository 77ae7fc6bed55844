"""DenseNet121 (Huang et al., 2017) with growth rate 32 for 32x32 inputs.

The CIFAR variant uses a single 3x3 stem convolution with 2 * growth channels (no 7x7
stem and no max pool) and halves the channels in every transition.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.registry import InputSpec, register_model
from engine.models.zoo.common import check_cifar_input


class DenseLayer(nn.Module):
    """BN -> ReLU -> Conv1x1 (4 * growth) -> BN -> ReLU -> Conv3x3 (growth), concatenated
    in front of the input.

    Input ``[N, C, H, W]``; output ``[N, growth + C, H, W]``.
    """

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        bottleneck_channels = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(bottleneck_channels)
        self.conv2 = nn.Conv2d(
            bottleneck_channels, growth_rate, kernel_size=3, padding=1, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))

        return torch.cat([out, x], dim=1)


class Transition(nn.Module):
    """BN -> ReLU -> Conv1x1 -> 2x2 average pool between two dense blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(F.relu(self.bn(x)))
        return F.avg_pool2d(out, 2)


class DenseNet(nn.Module):
    """3x3 stem, four dense blocks joined by transitions, BN -> ReLU -> global average
    pool and a linear head.

    Input ``[N, 3, 32, 32]``; output logits ``[N, classes]``.
    """

    def __init__(
        self,
        layers_per_block: tuple[int, int, int, int],
        growth_rate: int,
        reduction: float,
        in_channels: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        channels = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False)

        dense_blocks: list[nn.Sequential] = []
        transitions: list[Transition] = []
        for index, num_layers in enumerate(layers_per_block):
            layers = []
            for _ in range(num_layers):
                layers.append(DenseLayer(channels, growth_rate))
                channels += growth_rate
            dense_blocks.append(nn.Sequential(*layers))
            if index < len(layers_per_block) - 1:
                reduced = int(math.floor(channels * reduction))
                transitions.append(Transition(channels, reduced))
                channels = reduced
        # Registered in network order, so parameters() and state_dict() list the tensors
        # in the same order as the pytorch-cifar definition.
        self.dense1, self.trans1 = dense_blocks[0], transitions[0]
        self.dense2, self.trans2 = dense_blocks[1], transitions[1]
        self.dense3, self.trans3 = dense_blocks[2], transitions[2]
        self.dense4 = dense_blocks[3]

        self.bn = nn.BatchNorm2d(channels)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)

        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        out = self.trans3(self.dense3(out))
        out = self.dense4(out)

        out = F.adaptive_avg_pool2d(F.relu(self.bn(out)), 1)
        return self.linear(torch.flatten(out, 1))


@register_model("densenet121")
def densenet121(spec: InputSpec) -> DenseNet:
    """Build DenseNet121 (dense blocks of 6-12-24-16 layers, growth 32, reduction 0.5)
    for 3x32x32 inputs."""
    check_cifar_input("densenet121", spec)
    return DenseNet((6, 12, 24, 16), 32, 0.5, spec.channels, spec.num_classes)
