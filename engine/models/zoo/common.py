"""Input check shared by the CIFAR zoo builders."""

from __future__ import annotations

from engine.models.registry import InputSpec


def check_cifar_input(model_name: str, spec: InputSpec) -> None:
    """Raise ``ValueError`` unless ``spec`` describes 3x32x32 images.

    The zoo follows the CIFAR definitions, whose stems, downsampling and classifier
    widths are sized for 32x32 RGB images. The last feature map is 1x1 in VGG, 8x8 in
    GoogLeNet and 4x4 in the other families.
    """
    if (spec.channels, spec.height, spec.width) != (3, 32, 32):
        raise ValueError(
            f"model {model_name!r} expects 3x32x32 inputs (CIFAR-10 or CIFAR-100), "
            f"got {spec.channels}x{spec.height}x{spec.width}; choose a CIFAR dataset "
            f"or a model without a fixed input size"
        )
    if spec.num_classes < 1:
        raise ValueError(f"model {model_name!r} needs num_classes >= 1, got {spec.num_classes}")
