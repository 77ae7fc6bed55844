"""PNG figures of a run, chosen by the metrics and layout of the recipe's tables.

- A learnability table that lays N1 against N2 becomes a heatmap, ours beside the
  published values on one color scale.
- A table over N1 checkpoint epochs becomes learning curves: one line per N1, mean
  ± std over seeds as a band.
- ``distinct_predictions`` becomes one bar chart per N1: % of D3 by the number of
  distinct predictions of the seeds' N1.
- ``class_share_d2`` becomes one bar chart per N1 and regime of its 10 class
  shares, with the published shares as markers.

A cell with no finished run is drawn hatched grey and labelled "missing" in
heatmaps, as an ``x`` on the axis in learning curves, and as a "missing" panel in
bar charts. The figures are drawn on matplotlib's Agg canvas and never open a window.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from engine.experiments.plan import Plan
from engine.experiments.recipes import TableSpec
from engine.results.latex import ACROSS_SEED_METRICS, describe_group, layout_grid, sort_key, split_groups
from engine.results.summary import CellStats
from engine.results.table import CAP_MARK, METRIC_TITLES, field_value

CURVE_FIELD = "epoch"
METRIC_AXIS_LABELS = {
    "learnability": "learnability (% of D3)",
    "test_error": "N1 test error (% of D3)",
    "test_accuracy": "N1 test accuracy (% of D3)",
}
MISSING_FACE = "lightgrey"
MISSING_HATCH = "///"
DPI = 120


def _finite(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # Agg draws without a display or a pyplot window
    return figure


def _set_title(figure: Figure, title: str) -> None:
    """Set the figure title, wrapped to the figure's width (about 12 characters per inch)."""
    width = max(20, int(figure.get_figwidth() * 12))
    figure.suptitle("\n".join(textwrap.fill(line, width) for line in title.splitlines()), fontsize=11)


def _runs_note(row: CellStats | None, expected: int) -> str:
    """Return ``k/n runs`` where fewer runs finished than expected, else nothing."""
    runs = row.runs if row is not None else 0
    return f"{runs}/{expected} runs" if runs < expected else ""


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def _draw_heatmap_panel(
    axes,
    values: np.ndarray,
    labels: list[list[str]],
    vmin: float,
    vmax: float,
    empty_label: str,
):
    """Draw ``values`` (NaN where empty) with a text per cell, and return the image."""
    image = axes.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    colormap = image.get_cmap()
    for (i, j), value in np.ndenumerate(values):
        if math.isnan(value):
            axes.add_patch(Rectangle(
                (j - 0.5, i - 0.5), 1, 1, facecolor=MISSING_FACE, hatch=MISSING_HATCH, edgecolor="grey", linewidth=0,
            ))
            axes.text(j, i, empty_label, ha="center", va="center", fontsize=8, color="black")
            continue
        # Dark text on the light end of viridis, white text on the dark end.
        red, green, blue, _ = colormap((value - vmin) / (vmax - vmin) if vmax > vmin else 0.5)
        color = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
        axes.text(j, i, labels[i][j], ha="center", va="center", fontsize=8, color=color)
    return image


def _heatmap_label(row: CellStats, seeds: int) -> str:
    text = f"{row.mean:.1f}"
    if _finite(row.std):
        text += f"\n±{row.std:.1f}"
    if row.capped:
        text += CAP_MARK
    note = _runs_note(row, seeds)
    return f"{text}\n{note}" if note else text


def heatmap_figure(spec: TableSpec, rows: Sequence[CellStats], title: str, seeds: int) -> Figure:
    """Draw a metric's rows x columns grid, ours beside the published values on one color scale.

    The panel of published values is left out when none of the cells has one, as
    for a copied recipe with a grid the study did not measure.
    """
    grid = layout_grid(spec, rows)
    shape = (len(grid.row_ids), len(grid.col_ids))
    ours = np.full(shape, np.nan)
    paper = np.full(shape, np.nan)
    ours_labels = [["" for _ in grid.col_ids] for _ in grid.row_ids]
    paper_labels = [["" for _ in grid.col_ids] for _ in grid.row_ids]
    for i, ids in enumerate(grid.row_ids):
        for j, col in enumerate(grid.col_ids):
            row = grid.get(ids, col)
            if row is None:
                continue
            if row.runs:
                ours[i, j] = row.mean
                ours_labels[i][j] = _heatmap_label(row, seeds)
            if _finite(row.paper_mean):
                paper[i, j] = row.paper_mean
                paper_labels[i][j] = f"{row.paper_mean:.1f}"

    panels = [("ours", ours, ours_labels, "missing")]
    if not np.isnan(paper).all():
        panels.append(("published", paper, paper_labels, "no value"))
    finite = np.concatenate([values[~np.isnan(values)] for _, values, _, _ in panels])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)

    cell_width, cell_height = 0.9, 0.55
    width = len(panels) * (shape[1] * cell_width + 2.2) + 1.0
    height = shape[0] * cell_height + 1.8
    figure = _new_figure(width, height)
    axes_list = figure.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for axes, (name, values, labels, empty_label) in zip(axes_list, panels):
        image = _draw_heatmap_panel(axes, values, labels, vmin, vmax, empty_label)
        axes.set_title(name)
        axes.set_xticks(range(shape[1]), grid.col_ids, rotation=45, ha="right")
        axes.set_yticks(range(shape[0]), [", ".join(ids) for ids in grid.row_ids])
        axes.set_xlabel(spec.columns)
        axes.set_ylabel(", ".join(spec.rows))
    figure.colorbar(image, ax=list(axes_list), label=METRIC_AXIS_LABELS.get(spec.metric, spec.metric))
    _set_title(figure, title)
    return figure


def _curve_series(spec: TableSpec, rows: Iterable[CellStats]) -> dict[tuple[str, ...], dict[str, CellStats]]:
    """Group a metric's rows by every field but the epoch: one series each.

    The fields are the table's layout fields, plus those that :func:`split_groups`
    finds varying outside the layout (such as a second regime).
    """
    fields = [name for name in (*spec.rows, spec.columns) if name != CURVE_FIELD]
    series: dict[tuple[str, ...], dict[str, CellStats]] = {}
    for group, members in split_groups(spec, rows):
        for row in members:
            ids = tuple(field_value(row, name) for name in fields) + tuple(group.values())
            series.setdefault(ids, {})[field_value(row, CURVE_FIELD)] = row
    return series


def learning_curve_figure(specs: Sequence[TableSpec], rows: Sequence[CellStats], title: str) -> Figure:
    """Draw each metric over N1 checkpoint epochs, one line per N1, mean ± std as a band.

    The x axis lists the checkpoint epochs evenly spaced, then ``final``: the fully
    trained N1. A point with no finished run is an ``x`` on the bottom axis.
    """
    series_by_spec = [_curve_series(spec, rows) for spec in specs]
    epochs = sorted({epoch for series in series_by_spec for by_epoch in series.values() for epoch in by_epoch},
                    key=sort_key)
    positions = {epoch: k for k, epoch in enumerate(epochs)}

    figure = _new_figure(5.0 * len(specs) + 1.0, 4.0)
    axes_list = figure.subplots(1, len(specs), squeeze=False)[0]
    for axes, spec, series in zip(axes_list, specs, series_by_spec):
        missing_x = []
        for ids, by_epoch in series.items():
            points = sorted(by_epoch, key=sort_key)
            x = np.array([positions[epoch] for epoch in points], dtype=float)
            mean = np.array([by_epoch[e].mean if by_epoch[e].runs else np.nan for e in points])
            std = np.array([by_epoch[e].std if by_epoch[e].runs > 1 else np.nan for e in points])
            (line,) = axes.plot(x, mean, marker="o", label=", ".join(ids))
            band = ~np.isnan(std)
            if band.any():
                axes.fill_between(x, mean - np.where(band, std, 0), mean + np.where(band, std, 0),
                                  where=band, color=line.get_color(), alpha=0.2, linewidth=0)
            missing_x += list(x[np.isnan(mean)])
        if not any(row.runs for by_epoch in series.values() for row in by_epoch.values()):
            axes.set_ylim(0, 100)  # the percent range, instead of one around 0 with no data
        if missing_x:
            # x in data coordinates, y at the bottom of the axes.
            axes.plot(missing_x, [0.02] * len(missing_x), "x", color="grey", label="missing",
                      transform=axes.get_xaxis_transform(), clip_on=False)
        axes.set_xticks(range(len(epochs)), epochs)
        axes.set_xlabel("N1 checkpoint epoch")
        axes.set_ylabel(METRIC_AXIS_LABELS.get(spec.metric, spec.metric))
        axes.set_title(METRIC_TITLES[spec.metric], fontsize=9)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    _set_title(figure, title)
    return figure


def _bar_panels(
    spec: TableSpec,
    rows: Iterable[CellStats],
    x_field: str,
) -> dict[tuple[str, ...], dict[str, CellStats]]:
    """Group a metric's rows into panels by the layout fields other than ``x_field``."""
    fields = [name for name in (*spec.rows, spec.columns) if name != x_field]
    panels: dict[tuple[str, ...], dict[str, CellStats]] = {}
    for row in rows:
        if row.metric == spec.metric:
            ids = tuple(field_value(row, name) for name in fields)
            panels.setdefault(ids, {})[field_value(row, x_field)] = row
    return panels


def _draw_bars(axes, by_x: dict[str, CellStats], expected: int, color: str) -> None:
    """Draw bars of our means with std whiskers and the published values as markers."""
    xs = sorted(by_x, key=sort_key)
    positions = np.arange(len(xs))
    found = [by_x[x] for x in xs]
    if not any(row.runs for row in found):
        axes.add_patch(Rectangle((0, 0), 1, 1, transform=axes.transAxes, facecolor=MISSING_FACE,
                                 hatch=MISSING_HATCH, edgecolor="grey", linewidth=0))
        axes.text(0.5, 0.5, "missing", transform=axes.transAxes, ha="center", va="center")
    else:
        mean = np.array([row.mean if row.runs else np.nan for row in found])
        std = np.nan_to_num(np.array([row.std if row.runs > 1 else 0.0 for row in found]))
        axes.bar(positions, np.nan_to_num(mean), yerr=std if std.any() else None, color=color, label="ours",
                 capsize=2)
    paper = np.array([row.paper_mean if _finite(row.paper_mean) else np.nan for row in found])
    if not np.isnan(paper).all():
        axes.plot(positions, paper, "D", color="black", markersize=4, linestyle="none", label="published")
        axes.legend(fontsize=7)
    axes.set_xticks(positions, xs)
    notes = {_runs_note(row, expected) for row in found} - {""}
    if notes and any(row.runs for row in found):
        axes.text(0.98, 0.95, ", ".join(sorted(notes)), transform=axes.transAxes, ha="right", va="top", fontsize=7)


def _start_at_zero(axes_list) -> None:
    """Start the shared y axis of bar panels at 0, with 5% headroom above the highest mark.

    Shares of a set are never negative, so a std whisker below 0 carries no information.
    """
    top = max(axes.get_ylim()[1] for axes in axes_list)
    for axes in axes_list:
        axes.set_ylim(0, top * 1.05)


def distinct_predictions_figure(spec: TableSpec, rows: Sequence[CellStats], title: str) -> Figure:
    """Draw one bar chart per N1: % of D3 by the number of distinct predictions of its seeds."""
    panels = _bar_panels(spec, rows, "distinct")
    figure = _new_figure(3.6 * len(panels) + 1.0, 3.6)
    axes_list = figure.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    expected = 1  # one histogram per group of seeds
    for axes, (ids, by_x) in zip(axes_list, panels.items()):
        _draw_bars(axes, by_x, expected, "tab:blue")
        axes.set_title(", ".join(ids), fontsize=9)
        axes.set_xlabel("distinct predictions of the seeds' N1")
    axes_list[0].set_ylabel("% of D3")
    _start_at_zero(axes_list)
    _set_title(figure, title)
    return figure


def class_shares_figure(spec: TableSpec, rows: Sequence[CellStats], title: str, seeds: int) -> Figure:
    """Draw the class shares of N1's predictions on D2, one panel per N1 and regime.

    Panels form a grid: the last layout field other than the class (the regime in
    the shipped recipe) across, the others down.
    """
    panels = _bar_panels(spec, rows, "class")
    across = list(dict.fromkeys(ids[-1] for ids in panels))
    down = list(dict.fromkeys(ids[:-1] for ids in panels))
    figure = _new_figure(3.4 * len(across) + 0.5, 2.6 * len(down) + 0.8)
    axes_grid = figure.subplots(len(down), len(across), squeeze=False, sharey=True)
    for r, outer in enumerate(down):
        for c, inner in enumerate(across):
            axes = axes_grid[r][c]
            by_x = panels.get(outer + (inner,))
            if by_x is None:
                axes.set_axis_off()
                continue
            _draw_bars(axes, by_x, seeds, "tab:orange")
            axes.set_title(", ".join(outer + (inner,)), fontsize=9)
            if r == len(down) - 1:
                axes.set_xlabel("class")
            if c == 0:
                axes.set_ylabel("% of D2")
    _start_at_zero(axes_grid.ravel())
    _set_title(figure, title)
    return figure


def _save(figure: Figure, folder: Path, stem: str, written: list[Path]) -> None:
    """Save as ``folder/stem.png``, numbering the stem if an earlier figure took it."""
    path = folder / f"{stem}.png"
    number = 2
    while path in written:
        path = folder / f"{stem}_{number}.png"
        number += 1
    folder.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    written.append(path)


def _is_heatmap(spec: TableSpec) -> bool:
    layout = set(spec.rows) | {spec.columns}
    return spec.metric == "learnability" and {"n1", "n2"} <= layout and CURVE_FIELD not in layout


def write_figures(plan: Plan, rows: list[CellStats], folder: Path) -> list[Path]:
    """Draw the figures that the recipe's tables call for into ``folder``; return their paths.

    Tables that no figure fits (learnability per regime, TLP x PLP, seed agreement
    matrices) are left to ``table.md`` and ``table.tex``.
    """
    recipe = plan.recipe
    written: list[Path] = []
    curve_specs = [spec for spec in recipe.tables if CURVE_FIELD in (*spec.rows, spec.columns)]
    if curve_specs:
        figure = learning_curve_figure(curve_specs, rows, f"{recipe.name}: {recipe.title}")
        _save(figure, folder, "learning_curves", written)

    for spec in recipe.tables:
        if spec in curve_specs:
            continue
        seeds = 1 if spec.metric in ACROSS_SEED_METRICS else recipe.seeds
        for fields, members in split_groups(spec, rows):
            if not members:
                continue
            suffix = "".join(f"_{name}={value}" for name, value in fields.items())
            title = f"{recipe.name}: {METRIC_TITLES[spec.metric]}"
            if fields:
                title += f"\n{describe_group(fields)}"
            if _is_heatmap(spec):
                figure = heatmap_figure(spec, members, title, seeds)
                _save(figure, folder, _safe_name(f"heatmap_{spec.metric}{suffix}"), written)
            elif spec.metric == "distinct_predictions":
                figure = distinct_predictions_figure(spec, members, title)
                _save(figure, folder, _safe_name(f"distinct_predictions{suffix}"), written)
            elif spec.metric == "class_share_d2":
                figure = class_shares_figure(spec, members, title, seeds)
                _save(figure, folder, _safe_name(f"class_shares{suffix}"), written)
    return written
