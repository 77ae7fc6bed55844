"""Model registry and the architectures of the learnability study."""

from engine.models import (
    shallow,  # noqa: F401  (registers the shallow CNN and MLP families)
    zoo,  # noqa: F401  (registers the CIFAR zoo)
)
from engine.models.registry import (
    CIFAR10,
    CIFAR100,
    MNIST,
    InputSpec,
    count_parameters,
    create_model,
    is_model,
    list_models,
    register_family,
    register_model,
    validate_model_name,
)

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "MNIST",
    "InputSpec",
    "count_parameters",
    "create_model",
    "is_model",
    "list_models",
    "register_family",
    "register_model",
    "validate_model_name",
]
