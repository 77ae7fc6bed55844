"""Declarative experiment definitions: one TOML file per experiment in ``recipes/``.

A recipe names the dataset, the N1 and N2 architectures, the data regimes, N1's
batch sizes, the number of seeds, the metrics and the table layout. Every field
can be narrowed from the command line; a copy of a file with another grid runs
with ``python -m engine.recipe path/to/file.toml``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from engine.data.datasets import DATASET_NAMES, DATASET_SPECS
from engine.data.splits import validate_regime
from engine.errors import UsageError
from engine.models import create_model, validate_model_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

RECIPES_ENV = "ENGINE_RECIPES_DIR"
LAYOUT_KEYS = ("n1", "n2", "regime", "n1_batch_size", "metric")
METRICS = ("learnability", "test_accuracy")


def recipes_dir() -> Path:
    """Return the folder of the shipped recipes (``$ENGINE_RECIPES_DIR`` overrides it)."""
    if os.environ.get(RECIPES_ENV):
        return Path(os.environ[RECIPES_ENV])
    return Path(__file__).resolve().parents[2] / "recipes"


def list_recipes() -> list[str]:
    folder = recipes_dir()
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


@dataclass(frozen=True)
class Recipe:
    """One experiment: the grid to train and how to lay out its table.

    ``n2`` empty means "N2 has N1's architecture". ``rows`` and ``columns`` name the
    fields that index the table of learnability values (``metric`` puts each metric
    in its own column).
    """

    name: str
    title: str
    dataset: str
    n1: tuple[str, ...]
    n2: tuple[str, ...] = ()
    regimes: tuple[str, ...] = ("true_data",)
    n1_batch_sizes: tuple[int, ...] = (64,)
    seeds: int = 5
    metrics: tuple[str, ...] = METRICS
    rows: str = "n1"
    columns: str = "regime"
    paper_table: str = ""
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dataset not in DATASET_NAMES:
            raise UsageError(f"recipe {self.name}: unknown dataset {self.dataset!r}; choose from {', '.join(DATASET_NAMES)}")
        if not self.n1:
            raise UsageError(f"recipe {self.name}: n1 lists no model")
        for model in self.n1 + self.n2:
            validate_model_for(model, self.dataset)
        for regime in self.regimes:
            validate_regime(regime)
        for size in self.n1_batch_sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise UsageError(f"recipe {self.name}: batch size {size!r} must be a positive integer")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise UsageError(f"recipe {self.name}: seeds={self.seeds!r} must be a positive integer")
        for metric in self.metrics:
            if metric not in METRICS:
                raise UsageError(f"recipe {self.name}: unknown metric {metric!r}; choose from {', '.join(METRICS)}")
        for name, value in (("rows", self.rows), ("columns", self.columns)):
            if value not in LAYOUT_KEYS:
                raise UsageError(f"recipe {self.name}: {name}={value!r}; choose from {', '.join(LAYOUT_KEYS)}")

    def n2_for(self, n1: str) -> tuple[str, ...]:
        return self.n2 if self.n2 else (n1,)

    def narrowed(self, **changes: Any) -> "Recipe":
        """Return a copy with the given fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def validate_model_for(model: str, dataset: str) -> None:
    """Raise ``UsageError`` unless ``model`` is registered and accepts ``dataset``'s images."""
    validate_model_name(model)
    try:
        with torch.device("meta"):  # builds the shapes only, no memory or initialization
            create_model(model, DATASET_SPECS[dataset])
    except ValueError as exc:
        raise UsageError(f"model {model!r} cannot run on {dataset}: {exc}") from None


_FIELDS = {
    "title": str,
    "dataset": str,
    "n1": list,
    "n2": (list, str),
    "regimes": list,
    "n1_batch_sizes": list,
    "seeds": int,
    "metrics": list,
    "rows": str,
    "columns": str,
    "paper_table": str,
    "train": dict,
}


def load_recipe(name_or_path: str) -> Recipe:
    """Load a shipped recipe by name, or a recipe file by path.

    Raises:
        UsageError: the recipe is unknown, the file is not valid TOML, or a field is
            unknown or has the wrong type.
    """
    path = Path(name_or_path)
    if path.suffix == ".toml" or os.sep in name_or_path:
        if not path.is_file():
            raise UsageError(f"recipe file {name_or_path!r} not found; give an existing .toml file")
        name = path.stem
    else:
        name = name_or_path
        path = recipes_dir() / f"{name}.toml"
        if not path.is_file():
            raise UsageError(
                f"unknown recipe {name!r}; choose from {', '.join(list_recipes())} or give a .toml path"
            )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"recipe file {path} is not valid TOML: {exc}") from exc
    for key, value in data.items():
        if key not in _FIELDS:
            raise UsageError(f"recipe {name}: unknown field {key!r}; valid fields: {', '.join(_FIELDS)}")
        if not isinstance(value, _FIELDS[key]):
            raise UsageError(f"recipe {name}: field {key!r} has the wrong type ({type(value).__name__})")
    for key in ("title", "dataset", "n1"):
        if key not in data:
            raise UsageError(f"recipe {name}: required field {key!r} is missing")
    n2 = data.pop("n2", "same")
    if isinstance(n2, str) and n2 != "same":
        raise UsageError(f"recipe {name}: n2 must be a list of models or \"same\", got {n2!r}")
    return Recipe(
        name=name,
        n2=() if n2 == "same" else tuple(n2),
        paper_table=data.pop("paper_table", name),
        **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()},
    )
