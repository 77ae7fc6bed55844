"""``table.md``: our values beside the published ones, headed by the protocol used."""

from __future__ import annotations

import math
from typing import Any

from engine.experiments.plan import Plan
from engine.experiments.recipes import TableSpec
from engine.results.summary import CellStats

DATASET_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "mnist": "MNIST"}
FULL_SIZES = {"cifar10": (25000, 25000, 10000), "cifar100": (25000, 25000, 10000), "mnist": (30000, 30000, 10000)}
CAP_MARK = "*"


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None or math.isnan(mean):
        return "-"
    if std is None or math.isnan(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def format_cell(row: CellStats | None, seeds: int) -> str:
    """Render ``ours [paper]`` with marks for capped, failed and missing runs."""
    if row is None:
        return "not run"
    text = _pm(row.mean, row.std) if row.runs else "missing"
    if row.runs and row.capped:
        text += f" {CAP_MARK}({row.reached_target}/{row.runs} reached target)"
    if row.runs < seeds:
        notes = [f"{row.runs}/{seeds} runs"]
        if row.failed:
            notes.append(f"{row.failed} failed")
        text += f" ({', '.join(notes)})"
    if row.paper_mean is not None:
        text += f" [{_pm(row.paper_mean, row.paper_std)}]"
    return text


def protocol_lines(plan: Plan, execution: dict[str, Any]) -> list[str]:
    """Describe the protocol actually used, against the study's where it differs."""
    recipe, train = plan.recipe, plan.train
    full = FULL_SIZES[recipe.dataset]
    if plan.subset is None:
        sizes = f"|D1| = {full[0]:,}, |D2| = {full[1]:,}, |D3| = {full[2]:,} (full splits)"
    else:
        sizes = (
            f"|D1| = |D2| = |D3| = {plan.subset:,} (seeded class-balanced subsets; the study uses "
            f"{full[0]:,} / {full[1]:,} / {full[2]:,})"
        )
    seeds = f"{recipe.seeds} seeds (0-{recipe.seeds - 1})" if recipe.seeds > 1 else "1 seed (0)"
    if recipe.seeds != 5:
        seeds += "; the study uses 5"
    cap = f"epoch cap {train.max_epochs}" + ("" if train.max_epochs == 500 else " (the study uses 500)")
    error = "an evaluation pass after each epoch" if train.exact_train_error else "the forward passes of each epoch"
    lines = [
        f"- Data: {DATASET_TITLES[recipe.dataset]}, {sizes}; pixels scaled to [-1, 1], no augmentation.",
        f"- Seeds: {seeds}; each number is the mean ± sample std (ddof=1) over the runs that finished.",
        f"- Training: SGD lr {train.lr:g}, momentum {train.momentum:g}, weight decay {train.weight_decay:g}, "
        f"N1 batch {', '.join(map(str, recipe.n1_batch_sizes))}, N2 batch 64; lr divided by "
        f"{train.lr_drop_factor:g} after {train.plateau_epochs} epochs without a decrease of the training "
        f"error; stop below {100 * train.target_error:g}% training error (counted on {error}) or at the {cap}.",
        f"- Execution: device {execution.get('device', '?')}, precision {train.precision}"
        + "".join(f", {k} {v}" for k, v in execution.items() if k != "device")
        + ".",
    ]
    return lines


def field_value(row: CellStats, name: str) -> str:
    """Return a row's value of a layout field; ``class``, ``i``, ``epoch``... come from its key."""
    if hasattr(row, name) and name != "key":
        return str(getattr(row, name))
    if name == "key":
        return row.key
    parts = dict(part.split("=", 1) for part in row.key.split(",") if "=" in part)
    return parts.get(name, "")


def _sort_key(value: str):
    return (0, int(value), "") if value.lstrip("-").isdigit() else (1, 0, value)


SPLIT_FIELDS = ("regime", "n1_batch_size")


def render_grid(spec: TableSpec, rows: list[CellStats], seeds: int) -> list[str]:
    """Render one metric as Markdown grids: ``spec.rows`` down, ``spec.columns`` across.

    Rows that differ in a field outside the layout (two regimes in an N1 x N2 grid,
    say) get one grid each, headed by that field's value, so no cell hides another.
    """
    chosen = [r for r in rows if r.metric == spec.metric]
    if not chosen:
        return [f"(no {spec.metric} values)"]
    layout = set(spec.rows) | {spec.columns}
    outside = [name for name in SPLIT_FIELDS if name not in layout]
    groups: dict[tuple, list[CellStats]] = {}
    for r in chosen:
        groups.setdefault(tuple(field_value(r, name) for name in outside), []).append(r)
    if len(groups) == 1:
        return _render_one_grid(spec, chosen, rows, seeds)
    lines: list[str] = []
    for values, members in groups.items():
        label = ", ".join(f"{name} {value}" for name, value in zip(outside, values) if value)
        lines += [f"### {label}", ""] + _render_one_grid(spec, members, rows, seeds) + [""]
    return lines[:-1]


def _render_one_grid(spec: TableSpec, chosen: list[CellStats], rows: list[CellStats], seeds: int) -> list[str]:

    def row_id(r: CellStats) -> tuple[str, ...]:
        return tuple(field_value(r, name) for name in spec.rows)

    row_ids = list(dict.fromkeys(row_id(r) for r in chosen))
    if any(name in ("class", "i", "j", "distinct", "epoch", "tlp", "plp") for name in spec.rows):
        row_ids.sort(key=lambda ids: [_sort_key(v) for v in ids])
    col_ids = list(dict.fromkeys(field_value(r, spec.columns) for r in chosen))
    if spec.columns in ("class", "i", "j", "distinct", "epoch", "n1_batch_size"):
        col_ids.sort(key=_sort_key)
    lookup = {(row_id(r), field_value(r, spec.columns)): r for r in chosen}
    accuracy = {}
    if spec.with_accuracy:
        batch_sizes = {r.n1_batch_size for r in chosen}
        accuracy = {
            field_value(r, "n1"): r
            for r in rows
            if r.metric == "test_accuracy" and r.regime == "true_data" and r.n1_batch_size in batch_sizes
        }
    prefix = ""
    if spec.columns == "n2":
        prefix = "N2 "
    elif spec.columns in ("class", "j", "distinct", "epoch"):
        prefix = f"{spec.columns}="
    header = list(spec.rows) + [f"{prefix}{c}" for c in col_ids]
    if accuracy:
        header.append("N1 test accuracy")
    # Statistics across seeds are one value per group of seeds, not one per seed.
    runs = 1 if spec.metric in ("seed_agreement", "distinct_predictions") else seeds
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for ids in row_ids:
        cells = list(ids) + [format_cell(lookup.get((ids, c)), runs) for c in col_ids]
        if accuracy:
            cells.append(format_cell(accuracy.get(ids[spec.rows.index("n1")] if "n1" in spec.rows else ""), seeds))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


METRIC_TITLES = {
    "learnability": "Learnability (% of D3 where N2 predicts N1's class)",
    "test_accuracy": "N1 test accuracy (%)",
    "class_share_d2": "Class shares of N1's predictions on D2 (%)",
    "tlp_plp_percent": "D3 by TLP = [N1 correct] and PLP = [N2 agrees with N1] (% of D3)",
    "seed_agreement": "Agreement on D3 between the N1 of seeds i and j (fraction)",
    "distinct_predictions": "Images of D3 by the number of distinct predictions of the seeds' N1 (%)",
    "test_error": "N1 test error (%)",
}


def render_table(plan: Plan, rows: list[CellStats], execution: dict[str, Any]) -> str:
    """Render the recipe's tables in the study's layout, headed by the protocol used."""
    recipe = plan.recipe
    capped_any = any(r.runs and r.capped for r in rows)
    lines = [
        f"# {recipe.name}: {recipe.title}",
        "",
        "Protocol used:",
        "",
        *protocol_lines(plan, execution),
        "",
        "Cells: ours (mean ± std over seeds) [the published value]. "
        f"{CAP_MARK}: some runs stopped at the epoch cap before reaching the training-error target, "
        "so the cell is not comparable with the study's.",
    ]
    if capped_any:
        lines += ["", f"WARNING: cells marked {CAP_MARK} contain runs cut off by the epoch cap."]
    for spec in recipe.tables:
        lines += ["", f"## {METRIC_TITLES[spec.metric]}", ""]
        lines += render_grid(spec, rows, recipe.seeds)
    return "\n".join(lines) + "\n"
