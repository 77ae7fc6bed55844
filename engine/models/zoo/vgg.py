"""VGG11/13/16/19 for 32x32 inputs, with BatchNorm after every convolution.

The CIFAR variant keeps the convolutional stages of VGG and replaces the three fully
connected layers with a single Linear(512, classes). Five 2x2 max pools take 32x32 down
to 1x1, so the flattened features are exactly the 512 channels of the last stage.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.models.registry import InputSpec, register_model
from engine.models.zoo.common import check_cifar_input

# Output channels of each 3x3 convolution, with "M" for a 2x2 max pool.
VGG_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [
        64, 64, "M",
        128, 128, "M",
        256, 256, 256, "M",
        512, 512, 512, "M",
        512, 512, 512, "M",
    ],
    "vgg19": [
        64, 64, "M",
        128, 128, "M",
        256, 256, 256, 256, "M",
        512, 512, 512, 512, "M",
        512, 512, 512, 512, "M",
    ],
}


class VGG(nn.Module):
    """VGG feature stages (Conv3x3 with bias -> BatchNorm -> ReLU, max pools) and a linear head.

    Input ``[N, 3, 32, 32]``; output logits ``[N, classes]``.
    """

    def __init__(self, config: list[int | str], in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for entry in config:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out_channels = int(entry)
            layers += [
                nn.Conv2d(channels, out_channels, kernel_size=3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)

        out = torch.flatten(out, 1)
        return self.classifier(out)


def _build_vgg(name: str, spec: InputSpec) -> VGG:
    check_cifar_input(name, spec)
    return VGG(VGG_CONFIGS[name], spec.channels, spec.num_classes)


@register_model("vgg11")
def vgg11(spec: InputSpec) -> VGG:
    """Build VGG11 with BatchNorm (8 convolutions) for 3x32x32 inputs."""
    return _build_vgg("vgg11", spec)


@register_model("vgg13")
def vgg13(spec: InputSpec) -> VGG:
    """Build VGG13 with BatchNorm (10 convolutions) for 3x32x32 inputs."""
    return _build_vgg("vgg13", spec)


@register_model("vgg16")
def vgg16(spec: InputSpec) -> VGG:
    """Build VGG16 with BatchNorm (13 convolutions) for 3x32x32 inputs."""
    return _build_vgg("vgg16", spec)


@register_model("vgg19")
def vgg19(spec: InputSpec) -> VGG:
    """Build VGG19 with BatchNorm (16 convolutions) for 3x32x32 inputs."""
    return _build_vgg("vgg19", spec)
