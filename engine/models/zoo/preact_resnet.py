"""PreActResNet18 for 32x32 inputs (He et al., "Identity Mappings in Deep Residual
Networks", 2016).

As in the widely used pytorch-cifar definition, the network has no BatchNorm after the
stem convolution and none before the global pool: every block normalizes its own input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.registry import InputSpec, register_model
from engine.models.zoo.common import check_cifar_input

STAGE_WIDTHS = (64, 128, 256, 512)


class PreActBlock(nn.Module):
    """BatchNorm -> ReLU -> Conv3x3, twice, with an identity or 1x1-projection shortcut.

    The projection is a bare 1x1 convolution (no BatchNorm) applied to the already
    normalized and activated input; the identity shortcut takes the raw input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)

        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(
                in_channels, out_channels, kernel_size=1, stride=stride, bias=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)

        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))

        return out + shortcut


class PreActResNet(nn.Module):
    """3x3 stem, four stages of PreActBlocks, global average pool and a linear head.

    Input ``[N, 3, 32, 32]``; output logits ``[N, classes]``.
    """

    def __init__(
        self, blocks_per_stage: tuple[int, ...], in_channels: int, num_classes: int
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1, bias=False)

        channels = 64
        stages: list[nn.Sequential] = []
        for index, (width, num_blocks) in enumerate(zip(STAGE_WIDTHS, blocks_per_stage)):
            first_stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(num_blocks):
                stride = first_stride if block_index == 0 else 1
                blocks.append(PreActBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)

        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)

        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


@register_model("preact_resnet18")
def preact_resnet18(spec: InputSpec) -> PreActResNet:
    """Build PreActResNet18 (PreActBlocks 2-2-2-2) for 3x32x32 inputs."""
    check_cifar_input("preact_resnet18", spec)
    return PreActResNet((2, 2, 2, 2), spec.channels, spec.num_classes)
