"""ResNet18 and ResNet34 with BasicBlock for 32x32 inputs.

The CIFAR variant starts with a single 3x3 convolution at stride 1 (no 7x7 stem and no
max pool), so the four stages see 32, 16, 8 and 4 pixel sides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.registry import InputSpec, register_model
from engine.models.zoo.common import check_cifar_input

STAGE_WIDTHS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity or 1x1-projection shortcut.

    The shortcut projects (1x1 convolution + BatchNorm) when the block changes the
    stride or the channel count, because the identity would not match in shape.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)

        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))

        out = out + self.shortcut(x)
        return F.relu(out)


class ResNet(nn.Module):
    """3x3 stem, four stages of BasicBlocks, global average pool and a linear head.

    Input ``[N, 3, 32, 32]``; output logits ``[N, classes]``.
    """

    def __init__(
        self, blocks_per_stage: tuple[int, ...], in_channels: int, num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)

        channels = 64
        stages: list[nn.Sequential] = []
        for index, (width, num_blocks) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage)):
            # The first stage keeps the resolution, and each later one halves it in its
            # first block.
            first_stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                stride = first_stride if block_index == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))

        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)

        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


@register_model("resnet18")
def resnet18(spec: InputSpec) -> ResNet:
    """Build ResNet18 (BasicBlocks 2-2-2-2) for 3x32x32 inputs."""
    check_cifar_input("resnet18", spec)
    return ResNet((2, 2, 2, 2), spec.channels, spec.num_classes)


@register_model("resnet34")
def resnet34(spec: InputSpec) -> ResNet:
    """Build ResNet34 (BasicBlocks 3-4-6-3) for 3x32x32 inputs."""
    check_cifar_input("resnet34", spec)
    return ResNet((3, 4, 6, 3), spec.channels, spec.num_classes)
