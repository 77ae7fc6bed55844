"""DPN26, a Dual Path Network (Chen et al., 2017) for 32x32 inputs.

Each block adds to a residual path (the first ``residual_channels`` channels, summed)
and grows a densely connected path (``dense_depth`` new channels per block,
concatenated). Its 3x3 convolution has 32 groups, as in ResNeXt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.registry import InputSpec, register_model
from engine.models.zoo.common import check_cifar_input

GROUPS = 32


@dataclass(frozen=True)
class DPNConfig:
    """Per-stage widths of a DPN, one entry for each of the four stages."""

    bottleneck_channels: tuple[int, int, int, int]
    residual_channels: tuple[int, int, int, int]
    blocks_per_stage: tuple[int, int, int, int]
    dense_depth: tuple[int, int, int, int]


DPN26_CONFIG = DPNConfig(
    bottleneck_channels=(96, 192, 384, 768),
    residual_channels=(256, 512, 1024, 2048),
    blocks_per_stage=(2, 2, 2, 2),
    dense_depth=(16, 32, 24, 128),
)


class DualPathBlock(nn.Module):
    """1x1 -> grouped 3x3 -> 1x1 bottleneck whose output is split into a residual part
    and a dense part.

    Input ``[N, in_channels, H, W]``; output ``[N, C, H / stride, W / stride]`` with
    ``C = in_channels + dense_depth``, except in a stage's first block, whose projection
    shortcut resets it to ``residual_channels + 2 * dense_depth``.
    """

    def __init__(
        self,
        in_channels: int,
        bottleneck_channels: int,
        residual_channels: int,
        dense_depth: int,
        stride: int,
        first_in_stage: bool,
    ) -> None:
        super().__init__()
        self.residual_channels = residual_channels
        out_channels = residual_channels + dense_depth

        self.conv1 = nn.Conv2d(in_channels, bottleneck_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(bottleneck_channels)
        self.conv2 = nn.Conv2d(
            bottleneck_channels,
            bottleneck_channels,
            kernel_size=3,
            stride=stride,
            padding=1,
            groups=GROUPS,
            bias=False,
        )
        self.bn2 = nn.BatchNorm2d(bottleneck_channels)
        self.conv3 = nn.Conv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

        # A stage's first block changes the channel count (and the stride after stage 1),
        # so its shortcut projects. Later blocks pass the input through unchanged.
        self.shortcut: nn.Module = nn.Identity()
        if first_in_stage:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))

        # Sum the residual channels, keep the dense channels of the shortcut and append
        # the new dense channels of this block.
        x = self.shortcut(x)
        r = self.residual_channels
        out = torch.cat([x[:, :r] + out[:, :r], x[:, r:], out[:, r:]], dim=1)
        return F.relu(out)


class DPN(nn.Module):
    """3x3 stem, four stages of dual path blocks, global average pool and a linear head.

    Input ``[N, 3, 32, 32]``; output logits ``[N, classes]``.
    """

    def __init__(self, config: DPNConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)

        channels = 64
        stages: list[nn.Sequential] = []
        for index in range(4):
            first_stride = 1 if index == 0 else 2
            residual = config.residual_channels[index]
            dense = config.dense_depth[index]
            blocks = []
            for block_index in range(config.blocks_per_stage[index]):
                blocks.append(
                    DualPathBlock(
                        channels,
                        config.bottleneck_channels[index],
                        residual,
                        dense,
                        stride=first_stride if block_index == 0 else 1,
                        first_in_stage=block_index == 0,
                    )
                )
                # The first block outputs two dense slices (the projected shortcut's and
                # its own), and each later block appends one more.
                channels = residual + (block_index + 2) * dense
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


@register_model("dpn26")
def dpn26(spec: InputSpec) -> DPN:
    """Build DPN26 (two dual path blocks per stage) for 3x32x32 inputs."""
    check_cifar_input("dpn26", spec)
    return DPN(DPN26_CONFIG, spec.channels, spec.num_classes)
