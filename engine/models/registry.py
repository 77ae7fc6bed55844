"""Model registry: builders registered by name or by a name pattern.

Fixed names (``vgg11``) are registered with :func:`register_model`; families with a
parameter in the name (``shallow_cnn_w{width}``) are registered with
:func:`register_family`, whose regular expression turns the name into keyword
arguments for the builder.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from engine.errors import UsageError

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class InputSpec:
    """Shape of one input image and the number of classes a model predicts."""

    channels: int
    height: int
    width: int
    num_classes: int


CIFAR10 = InputSpec(3, 32, 32, 10)
CIFAR100 = InputSpec(3, 32, 32, 100)
MNIST = InputSpec(1, 28, 28, 10)

_MODELS: dict[str, Builder] = {}
_FAMILIES: dict[str, tuple[re.Pattern[str], Builder, tuple[str, ...]]] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Register a builder under a fixed name; a duplicate name raises ``ValueError``."""

    def decorate(builder: Builder) -> Builder:
        if name in _MODELS or name in _FAMILIES:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = builder
        return builder

    return decorate


def register_family(
    template: str, pattern: str, examples: tuple[str, ...]
) -> Callable[[Builder], Builder]:
    """Register a builder for every name that fully matches ``pattern``.

    Args:
        template: the family's name as shown to users, e.g. ``shallow_cnn_w{width}``.
        pattern: regular expression whose named groups are integer builder arguments.
        examples: the names of this family that ``list_models`` shows.
    """

    def decorate(builder: Builder) -> Builder:
        if template in _FAMILIES or template in _MODELS:
            raise ValueError(f"model family {template!r} is already registered")
        _FAMILIES[template] = (re.compile(pattern), builder, examples)
        return builder

    return decorate


def _resolve(name: str) -> tuple[Builder, dict[str, int]]:
    if name in _MODELS:
        return _MODELS[name], {}
    for regex, builder, _ in _FAMILIES.values():
        match = regex.fullmatch(name)
        if match:
            return builder, {key: int(value) for key, value in match.groupdict().items()}
    raise UsageError(
        f"unknown model {name!r}; choose a registered name or family "
        f"({', '.join(sorted(_MODELS) + sorted(_FAMILIES))})"
    )


def is_model(name: str) -> bool:
    """Return whether ``name`` resolves to a registered builder."""
    try:
        _resolve(name)
    except ValueError:
        return False
    return True


def validate_model_name(name: str) -> None:
    """Raise ``UsageError`` (a ``ValueError``) naming the model and the choices unless it is registered."""
    _resolve(name)


def list_models(pattern: str = "*") -> list[str]:
    """List registered names and family examples that match a shell-style pattern."""
    names = list(_MODELS)
    for _, _, examples in _FAMILIES.values():
        names.extend(examples)
    return sorted(name for name in set(names) if fnmatch.fnmatch(name, pattern))


def create_model(name: str, spec: InputSpec = CIFAR10) -> nn.Module:
    """Build the named model for inputs of shape ``spec``.

    Raises:
        ValueError: the name is not registered, or the model does not support ``spec``.
    """
    builder, kwargs = _resolve(name)
    return builder(spec=spec, **kwargs)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """Return (parameter tensors, parameters) of a model."""
    params = list(model.parameters())
    return len(params), sum(p.numel() for p in params)
