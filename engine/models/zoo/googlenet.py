"""GoogLeNet (Szegedy et al., 2015) with BatchNorm for 32x32 inputs.

The CIFAR variant replaces the 7x7 stem and its pools with one 3x3 convolution of 192
channels, drops the auxiliary classifiers, and builds each "5x5" branch from two 3x3
convolutions. All convolutions keep their bias, as in the widely used pytorch-cifar
definition, even though a BatchNorm follows each of them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from engine.models.registry import InputSpec, register_model
from engine.models.zoo.common import check_cifar_input


class InceptionWidths(NamedTuple):
    """Channel counts of one Inception block's four branches."""

    conv1x1: int
    reduce3x3: int
    conv3x3: int
    reduce5x5: int
    conv5x5: int
    pool_proj: int

    @property
    def out_channels(self) -> int:
        return self.conv1x1 + self.conv3x3 + self.conv5x5 + self.pool_proj


# Widths of blocks 3a-3b, 4a-4e and 5a-5b, as in the pytorch-cifar definition. A 3x3
# max pool at stride 2 sits between the stages.
STAGE3 = (
    InceptionWidths(64, 96, 128, 16, 32, 32),
    InceptionWidths(128, 128, 192, 32, 96, 64),
)
STAGE4 = (
    InceptionWidths(192, 96, 208, 16, 48, 64),
    InceptionWidths(160, 112, 224, 24, 64, 64),
    InceptionWidths(128, 128, 256, 24, 64, 64),
    InceptionWidths(112, 144, 288, 32, 64, 64),
    InceptionWidths(256, 160, 320, 32, 128, 128),
)
STAGE5 = (
    InceptionWidths(256, 160, 320, 32, 128, 128),
    InceptionWidths(384, 192, 384, 48, 128, 128),
)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class Inception(nn.Module):
    """Four parallel branches concatenated along channels: 1x1; 1x1 -> 3x3;
    1x1 -> 3x3 -> 3x3; and 3x3 max pool -> 1x1.

    Input ``[N, in_channels, H, W]``; output ``[N, widths.out_channels, H, W]``.
    """

    def __init__(self, in_channels: int, widths: InceptionWidths) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*_conv_bn_relu(in_channels, widths.conv1x1, 1))
        self.b2 = nn.Sequential(
            *_conv_bn_relu(in_channels, widths.reduce3x3, 1),
            *_conv_bn_relu(widths.reduce3x3, widths.conv3x3, 3),
        )
        # Two stacked 3x3 convolutions cover the 5x5 receptive field of the original branch.
        self.b3 = nn.Sequential(
            *_conv_bn_relu(in_channels, widths.reduce5x5, 1),
            *_conv_bn_relu(widths.reduce5x5, widths.conv5x5, 3),
            *_conv_bn_relu(widths.conv5x5, widths.conv5x5, 3),
        )
        self.b4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1),
            *_conv_bn_relu(in_channels, widths.pool_proj, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


def _inception_stage(in_channels: int, stage: tuple[InceptionWidths, ...]) -> nn.Sequential:
    blocks = []
    for widths in stage:
        blocks.append(Inception(in_channels, widths))
        in_channels = widths.out_channels
    return nn.Sequential(*blocks)


class GoogLeNet(nn.Module):
    """3x3 stem, Inception stages at 32, 16 and 8 pixel sides, global average pool and a
    linear head.

    Input ``[N, 3, 32, 32]``; output logits ``[N, classes]``.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.pre_layers = nn.Sequential(*_conv_bn_relu(in_channels, 192, 3))
        self.stage3 = _inception_stage(192, STAGE3)
        self.stage4 = _inception_stage(STAGE3[-1].out_channels, STAGE4)
        self.stage5 = _inception_stage(STAGE4[-1].out_channels, STAGE5)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.linear = nn.Linear(STAGE5[-1].out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pre_layers(x)

        out = self.stage3(out)
        out = self.maxpool(out)
        out = self.stage4(out)
        out = self.maxpool(out)
        out = self.stage5(out)

        out = torch.flatten(torch.mean(out, dim=(2, 3)), 1)
        return self.linear(out)


@register_model("googlenet")
def googlenet(spec: InputSpec) -> GoogLeNet:
    """Build GoogLeNet with BatchNorm (nine Inception blocks, no auxiliary heads) for
    3x32x32 inputs."""
    check_cifar_input("googlenet", spec)
    return GoogLeNet(spec.channels, spec.num_classes)
