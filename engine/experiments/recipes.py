"""Declarative experiment definitions: one TOML file per experiment in ``recipes/``.

A recipe names the dataset, the N1 and N2 architectures, the data regimes, N1's
batch sizes, the number of seeds, the metrics and the table layout. Every field
can be narrowed from the command line; a copy of a file with another grid runs
with ``python -m engine.recipe path/to/file.toml``.
"""

from __future__ import annotations

import dataclasses
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
# Fields a table can be indexed by; the last ones are parsed from a statistic's key
# ("class=3", "tlp=0,plp=1", "i=0,j=4", "distinct=2", "epoch=5").
LAYOUT_KEYS = ("n1", "n2", "regime", "n1_batch_size", "metric", "key", "class", "tlp", "plp", "i", "j",
               "distinct", "epoch")
METRICS = (
    "learnability",  # % of D3 where N2 predicts N1's class
    "test_accuracy",  # % of D3 where N1 predicts the true class
    "class_share_d2",  # % of N1's predictions on D2 per class
    "tlp_plp_percent",  # % of D3 per (N1 correct, N2 agrees with N1)
    "seed_agreement",  # fraction of D3 where N1 of seeds i and j agree
    "distinct_predictions",  # % of D3 where the N1 of all seeds make m distinct predictions
    "test_error",  # % of D3 that N1 (or an N1 checkpoint) gets wrong
)
N2_METRICS = ("learnability", "tlp_plp_percent")


@dataclass(frozen=True)
class TableSpec:
    """One table of a report: a metric laid out by rows (one or more fields) and columns."""

    metric: str = "learnability"
    rows: tuple[str, ...] = ("n1",)
    columns: str = "regime"
    with_accuracy: bool = False  # add N1's true-data test accuracy as a last column

    @classmethod
    def from_dict(cls, recipe: str, values: dict[str, Any]) -> "TableSpec":
        unknown = set(values) - {"metric", "rows", "columns", "with_accuracy"}
        if unknown:
            raise UsageError(f"recipe {recipe}: unknown table field {sorted(unknown)[0]!r}")
        rows = values.get("rows", ["n1"])
        spec = cls(
            metric=values.get("metric", "learnability"),
            rows=tuple([rows] if isinstance(rows, str) else rows),
            columns=values.get("columns", "regime"),
            with_accuracy=bool(values.get("with_accuracy", False)),
        )
        if spec.metric not in METRICS:
            raise UsageError(f"recipe {recipe}: unknown table metric {spec.metric!r}; choose from {', '.join(METRICS)}")
        for name in spec.rows + (spec.columns,):
            if name not in LAYOUT_KEYS:
                raise UsageError(f"recipe {recipe}: table field {name!r}; choose from {', '.join(LAYOUT_KEYS)}")
        return spec


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

    ``n2`` empty means "N2 has N1's architecture"; ``train_n2`` False trains no N2
    (statistics of N1 alone). ``checkpoints`` lists N1 epochs whose predictions are
    kept and labelled for an N2 each (learning curves). ``tables`` lay the metrics out.
    """

    name: str
    title: str
    dataset: str
    n1: tuple[str, ...]
    n2: tuple[str, ...] = ()
    regimes: tuple[str, ...] = ("true_data",)
    n1_batch_sizes: tuple[int, ...] = (64,)
    seeds: int = 5
    metrics: tuple[str, ...] = ("learnability", "test_accuracy")
    tables: tuple[TableSpec, ...] = (TableSpec(with_accuracy=True),)
    train_n2: bool = True
    checkpoints: tuple[int, ...] = ()
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
            if metric in N2_METRICS and not self.train_n2:
                raise UsageError(f"recipe {self.name}: metric {metric!r} needs N2, but n2 is \"none\"")
        for epoch in self.checkpoints:
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
                raise UsageError(f"recipe {self.name}: checkpoint epoch {epoch!r} must be a positive integer")
        if "seed_agreement" in self.metrics and self.seeds < 2:
            raise UsageError(f"recipe {self.name}: seed agreement needs at least 2 seeds, got {self.seeds}")

    def n2_for(self, n1: str) -> tuple[str, ...]:
        if not self.train_n2:
            return ()
        return self.n2 if self.n2 else (n1,)

    def to_dict(self) -> dict[str, Any]:
        """Return every field as JSON-ready values, for saving with a run."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Recipe":
        """Rebuild a recipe saved by :meth:`to_dict`."""
        fields = dict(values)
        fields["tables"] = tuple(TableSpec(**{**t, "rows": tuple(t["rows"])}) for t in fields.get("tables", ()))
        for name in ("n1", "n2", "regimes", "n1_batch_sizes", "metrics", "checkpoints"):
            if name in fields:
                fields[name] = tuple(fields[name])
        return cls(**fields)

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
    "tables": list,
    "checkpoints": list,
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
    if isinstance(n2, str) and n2 not in ("same", "none"):
        raise UsageError(f"recipe {name}: n2 must be a list of models, \"same\" or \"none\", got {n2!r}")
    tables = tuple(TableSpec.from_dict(name, t) for t in data.pop("tables", [{"with_accuracy": True}]))
    return Recipe(
        name=name,
        n2=tuple(n2) if isinstance(n2, list) else (),
        train_n2=n2 != "none",
        tables=tables,
        paper_table=data.pop("paper_table", name),
        **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()},
    )
