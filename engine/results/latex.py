"""``table.tex``: the recipe's tables as LaTeX tabulars, ours beside the published values.

Each table of the recipe becomes one ``table`` environment with a ``booktabs``
tabular. A cell shows our mean ± std over seeds, then the published value in a
column of its own. Cells marked ``*`` contain runs stopped at the epoch cap, and
a cell with fewer finished runs than seeds shows ``(k/n)``: k of n runs finished.

The grid helpers here (:func:`split_groups`, :func:`layout_grid`) are shared with
the figures, so a figure and its table list rows and columns in the same order.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable

from engine.experiments.plan import Plan
from engine.experiments.recipes import LAYOUT_KEYS, TableSpec
from engine.results.summary import CellStats
from engine.results.table import CAP_MARK, METRIC_TITLES, field_value, protocol_lines

# Layout fields whose values are numbers, so their order is numeric ("final" sorts last).
NUMERIC_FIELDS = ("class", "i", "j", "distinct", "epoch", "tlp", "plp", "n1_batch_size")
# Statistics across seeds are one value per group of seeds, not one per seed.
ACROSS_SEED_METRICS = ("seed_agreement", "distinct_predictions")

_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}


def latex_escape(text: str) -> str:
    """Escape the characters that LaTeX treats as commands in running text."""
    return "".join(_LATEX_SPECIALS.get(char, char) for char in text)


def sort_key(value: str) -> tuple:
    """Order integers numerically, before any other value (such as ``final``)."""
    return (0, int(value), "") if value.lstrip("-").isdigit() else (1, 0, value)


@dataclass
class Grid:
    """A metric laid out as ``row_ids`` (one tuple per row) by ``col_ids``."""

    spec: TableSpec
    row_ids: list[tuple[str, ...]]
    col_ids: list[str]
    cells: dict[tuple[tuple[str, ...], str], CellStats]

    def get(self, row_id: tuple[str, ...], col_id: str) -> CellStats | None:
        return self.cells.get((row_id, col_id))


def layout_grid(spec: TableSpec, rows: Iterable[CellStats]) -> Grid:
    """Lay out the rows of ``spec.metric``, in the order ``table.md`` uses."""
    chosen = [r for r in rows if r.metric == spec.metric]

    def row_id(r: CellStats) -> tuple[str, ...]:
        return tuple(field_value(r, name) for name in spec.rows)

    row_ids = list(dict.fromkeys(row_id(r) for r in chosen))
    if any(name in NUMERIC_FIELDS for name in spec.rows):
        row_ids.sort(key=lambda ids: [sort_key(v) for v in ids])
    col_ids = list(dict.fromkeys(field_value(r, spec.columns) for r in chosen))
    if spec.columns in NUMERIC_FIELDS:
        col_ids.sort(key=sort_key)
    cells = {(row_id(r), field_value(r, spec.columns)): r for r in chosen}
    return Grid(spec, row_ids, col_ids, cells)


def split_groups(spec: TableSpec, rows: Iterable[CellStats]) -> list[tuple[dict[str, str], list[CellStats]]]:
    """Split a metric's rows where the table's layout would put two of them in one cell.

    A copied recipe may, for example, lay out an N1 x N2 grid over two regimes. The
    rows are then split by every field whose values differ between such colliding
    rows, and each group comes with those fields' values. Without collisions there is one group
    with no fields.
    """
    chosen = [r for r in rows if r.metric == spec.metric]
    layout = set(spec.rows) | {spec.columns}
    candidates = [name for name in LAYOUT_KEYS if name not in layout and name not in ("metric", "key")]
    seen: dict[tuple, CellStats] = {}
    split_fields: list[str] = []
    for r in chosen:
        position = tuple(field_value(r, name) for name in spec.rows) + (field_value(r, spec.columns),)
        other = seen.setdefault(position, r)
        for name in candidates:
            if other is not r and field_value(other, name) != field_value(r, name) and name not in split_fields:
                split_fields.append(name)
    if not split_fields:
        return [({}, chosen)]
    groups: dict[tuple[str, ...], list[CellStats]] = {}
    for r in chosen:
        groups.setdefault(tuple(field_value(r, name) for name in split_fields), []).append(r)
    return [(dict(zip(split_fields, values)), members) for values, members in groups.items()]


def describe_group(fields: dict[str, str]) -> str:
    """Return ``regime random_labels, n1_batch_size 32`` for a group's fields."""
    return ", ".join(f"{name} {value}" for name, value in fields.items())


def _number(mean: float | None, std: float | None) -> str:
    if mean is None or math.isnan(mean):
        return "--"
    if std is None or math.isnan(std):
        return f"${mean:.2f}$"
    return f"${mean:.2f} \\pm {std:.2f}$"


def format_ours(row: CellStats | None, seeds: int) -> str:
    """Render our value with ``*`` for capped runs and ``k/n`` for missing ones."""
    if row is None:
        return r"\textit{not run}"
    if not row.runs:
        text = r"\textit{missing}"
    else:
        text = _number(row.mean, row.std)
        if row.capped:
            text += CAP_MARK
    if row.runs < seeds:
        notes = [f"{row.runs}/{seeds}"]
        if row.failed:
            notes.append(f"{row.failed} failed")
        text += f" ({', '.join(notes)})"
    return text


def format_paper(row: CellStats | None) -> str:
    return "--" if row is None else _number(row.paper_mean, row.paper_std)


def _accuracy_lookup(rows: list[CellStats], fields: dict[str, str]) -> dict[str, CellStats]:
    """Map N1 to its true-data test accuracy row, within a group's fixed fields."""
    lookup = {}
    for r in rows:
        if r.metric != "test_accuracy" or r.regime != "true_data":
            continue
        if all(field_value(r, name) == value for name, value in fields.items() if name in ("n1", "n1_batch_size")):
            lookup[r.n1] = r
    return lookup


def render_tabular(
    plan: Plan,
    spec: TableSpec,
    rows: list[CellStats],
    fields: dict[str, str],
    all_rows: list[CellStats],
) -> list[str]:
    """Render one group of one table as a ``table`` environment."""
    recipe = plan.recipe
    seeds = 1 if spec.metric in ACROSS_SEED_METRICS else recipe.seeds
    grid = layout_grid(spec, rows)
    accuracy = _accuracy_lookup(all_rows, fields) if spec.with_accuracy and "n1" in spec.rows else {}

    # Each column of values: its header, our row per row id, and the runs expected.
    columns: list[tuple[str, dict[tuple[str, ...], CellStats | None], int]] = []
    prefix = ""
    if spec.columns == "n2":
        prefix = "N2 "
    elif spec.columns in NUMERIC_FIELDS:
        prefix = f"{spec.columns}="
    for col in grid.col_ids:
        columns.append((f"{prefix}{col}", {ids: grid.get(ids, col) for ids in grid.row_ids}, seeds))
    if accuracy:
        n1_at = spec.rows.index("n1")
        columns.append(("N1 test accuracy", {ids: accuracy.get(ids[n1_at]) for ids in grid.row_ids}, recipe.seeds))
    with_paper = any(
        row is not None and row.paper_mean is not None for _, by_row, _ in columns for row in by_row.values()
    )
    width = 2 if with_paper else 1

    title = f"{recipe.name}: {METRIC_TITLES[spec.metric]}"
    if fields:
        title += f", {describe_group(fields)}"
    label = re.sub(r"[^A-Za-z0-9]+", "-", "-".join([recipe.name, spec.metric, *fields.values()]))
    lines = [
        r"\begin{table}[ht]",
        r"\centering",
        f"\\caption{{{latex_escape(title)}}}",
        f"\\label{{tab:{label}}}",
        f"\\begin{{tabular}}{{{'l' * len(spec.rows)} {'r' * (width * len(columns))}}}",
        r"\toprule",
    ]
    first = len(spec.rows) + 1
    if with_paper:
        groups = [f"\\multicolumn{{2}}{{c}}{{{latex_escape(header)}}}" for header, _, _ in columns]
        rules = [f"\\cmidrule(lr){{{first + 2 * k}-{first + 2 * k + 1}}}" for k in range(len(columns))]
        lines.append(" & ".join([""] * len(spec.rows) + groups) + r" \\")
        lines.append(" ".join(rules))
        lines.append(" & ".join([latex_escape(name) for name in spec.rows] + ["ours", "paper"] * len(columns)) + r" \\")
    else:
        headers = [latex_escape(name) for name in spec.rows] + [latex_escape(header) for header, _, _ in columns]
        lines.append(" & ".join(headers) + r" \\")
    lines.append(r"\midrule")
    for ids in grid.row_ids:
        cells = [latex_escape(value) for value in ids]
        for _, by_row, expected in columns:
            row = by_row[ids]
            cells.append(format_ours(row, expected))
            if with_paper:
                cells.append(format_paper(row))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return lines


def render_latex(plan: Plan, rows: list[CellStats], execution: dict[str, Any]) -> str:
    """Render every table of the recipe, headed by the protocol as LaTeX comments."""
    recipe = plan.recipe
    header = [
        f"{recipe.name}: {recipe.title}",
        "Written by python -m engine.report from the run's stored networks. Needs \\usepackage{booktabs}.",
        "",
        "Protocol used:",
        *protocol_lines(plan, execution),
        "",
        "Cells: ours (mean ± std over seeds) beside the published value (paper).",
        f"{CAP_MARK}: some runs stopped at the epoch cap before reaching the training-error target,",
        "so the cell is not comparable with the study's. (k/n): k of n runs finished.",
        "missing: no run of the cell finished. not run: the grid has no such cell.",
    ]
    lines = [f"% {line}".rstrip() for line in header]
    for spec in recipe.tables:
        groups = split_groups(spec, rows)
        if not groups[0][1]:
            lines += ["", f"% (no {spec.metric} values)"]
            continue
        for fields, members in groups:
            lines.append("")
            lines += render_tabular(plan, spec, members, fields, rows)
    return "\n".join(lines) + "\n"
