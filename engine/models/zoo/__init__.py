"""The CIFAR model zoo: VGG, ResNet, PreActResNet, DPN, DenseNet and GoogLeNet for
3x32x32 inputs, following the widely used pytorch-cifar definitions.

Importing this package registers every builder with the model registry.
"""

from engine.models.zoo import densenet, dpn, googlenet, preact_resnet, resnet, vgg  # noqa: F401

ZOO_MODELS = (
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
    "resnet18",
    "resnet34",
    "preact_resnet18",
    "dpn26",
    "densenet121",
    "googlenet",
)
