"""``table.md``: our values beside the published ones, headed by the protocol used."""

from __future__ import annotations

import math
from typing import Any

from engine.experiments.plan import Plan
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
    seeds = f"{recipe.seeds} seeds (0-{recipe.seeds - 1})" + ("" if recipe.seeds == 5 else "; the study uses 5")
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


def render_table(plan: Plan, rows: list[CellStats], execution: dict[str, Any]) -> str:
    """Render the learnability table in the study's layout, with test accuracy beside it."""
    recipe = plan.recipe
    row_key, col_key = recipe.rows, recipe.columns
    learn = [r for r in rows if r.metric == "learnability"]
    acc = {getattr(r, row_key): r for r in rows if r.metric == "test_accuracy" and r.regime == "true_data"}
    row_values = list(dict.fromkeys(getattr(r, row_key) for r in rows if r.metric != "param_count"))
    col_values = ["learnability"] if col_key == "metric" else list(dict.fromkeys(getattr(r, col_key) for r in learn))
    lookup = {(getattr(r, row_key), "learnability" if col_key == "metric" else getattr(r, col_key)): r for r in learn}
    show_acc = bool(acc) and col_key != "n1_batch_size"
    header = [row_key] + [str(c) if col_key != "metric" else "learnability" for c in col_values]
    if col_key == "n2":
        header[1:] = [f"N2 {c}" for c in col_values]
    if show_acc:
        header.append("N1 test accuracy")
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
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for value in row_values:
        cells = [str(value)] + [format_cell(lookup.get((value, c)), recipe.seeds) for c in col_values]
        if show_acc:
            cells.append(format_cell(acc.get(value), recipe.seeds))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
