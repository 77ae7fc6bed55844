"""``python -m engine.report``: tables, LaTeX, figures and missing cells from stored networks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from conftest import REPO

from engine import recipe as recipe_cli
from engine import report
from engine.experiments.recipes import TableSpec
from engine.results.figures import heatmap_figure, learning_curve_figure
from engine.results.latex import latex_escape, layout_grid, split_groups
from engine.results.summary import CellStats

TINY = ["--seeds", "1", "--subset", "20", "--max-epochs", "2", "--no-fuse", "--quiet"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID_N1 = ("shallow_cnn_w16", "shallow_cnn_w32")


def train_tiny(name: str, extra: list[str], out: Path, data_dir: Path) -> Path:
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        code = recipe_cli.main([name, *TINY, *extra, "--data-dir", str(data_dir), "--out", str(out)])
    finally:
        torch.set_num_threads(previous)
    assert code == 0, f"training the tiny {name} run failed"
    return out


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory, data_dir) -> Path:
    """A 2 x 1 learnability grid: two N1 widths, one N2, one seed."""
    out = tmp_path_factory.mktemp("table10")
    return train_tiny("table10", ["--n1", ",".join(GRID_N1), "--n2", "shallow_cnn_w16"], out, data_dir)


@pytest.fixture
def grid_copy(grid_run, tmp_path) -> Path:
    """A copy of the grid run that a test may change."""
    return Path(shutil.copytree(grid_run, tmp_path / "run"))


def assert_valid_png(path: Path) -> None:
    assert path.is_file(), f"{path.name} was not written"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{path.name} is not a PNG"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3, f"{path.name} has shape {image.shape}"
    assert image.shape[0] > 50, f"{path.name} has shape {image.shape}"
    assert image.shape[1] > 50, f"{path.name} has shape {image.shape}"


def delete_n2_record(run_dir: Path, n1_model: str) -> str:
    """Delete the record of the N2 that learned ``n1_model``'s labels; return its key."""
    records = {p.stem: json.loads(p.read_text()) for p in (run_dir / "networks").glob("*.json")}
    n1_key = next(k for k, r in records.items() if r["config"]["role"] == "n1" and r["config"]["model"] == n1_model)
    n2_key = next(k for k, r in records.items() if r["config"]["parent"] == n1_key)
    (run_dir / "networks" / f"{n2_key}.json").unlink()
    return n2_key


def test_report_rewrites_summary_byte_for_byte(grid_copy, capsys):
    summary = (grid_copy / "summary.csv").read_bytes()
    table = (grid_copy / "table.md").read_bytes()
    (grid_copy / "summary.csv").unlink()
    (grid_copy / "table.md").unlink()

    assert report.main([str(grid_copy)]) == 0
    assert (grid_copy / "summary.csv").read_bytes() == summary
    assert (grid_copy / "table.md").read_bytes() == table
    out = capsys.readouterr().out
    assert "missing: 0 of 2 cells" in out
    for name in ("summary.csv", "table.md", "table.tex", "missing.txt", "figures/heatmap_learnability.png"):
        assert f"wrote {grid_copy / name}" in out, f"{name} is not in the list of paths written"


def test_latex_table_contains_values(grid_copy):
    assert report.main([str(grid_copy), "--no-figures"]) == 0
    tex = (grid_copy / "table.tex").read_text()
    rows = (grid_copy / "summary.csv").read_text().splitlines()[1:]
    learnability = [row.split(",") for row in rows if ",learnability," in row]
    assert len(learnability) == 2
    for fields in learnability:
        mean, paper_mean = fields[8], fields[14]
        assert f"${mean}$*" in tex, f"our learnability {mean} (capped at 2 epochs) is not in table.tex"
        assert f"${paper_mean} \\pm" in tex, f"the published {paper_mean} is not in table.tex"
    assert tex.startswith("% table10: ")
    assert "% - Training: SGD lr 0.01" in tex
    assert r"\begin{tabular}" in tex
    assert r"\end{tabular}" in tex
    assert r"shallow\_cnn\_w32" in tex
    assert r"N1 test accuracy" in tex


def test_heatmap_is_valid_png(grid_copy):
    assert report.main([str(grid_copy)]) == 0
    assert_valid_png(grid_copy / "figures" / "heatmap_learnability.png")


def test_no_figures_writes_tables_only(grid_copy):
    shutil.rmtree(grid_copy / "figures", ignore_errors=True)
    assert report.main([str(grid_copy), "--no-figures"]) == 0
    assert (grid_copy / "table.tex").is_file()
    assert not (grid_copy / "figures").exists()


def test_partial_run_lists_missing_cell(grid_copy, capsys):
    delete_n2_record(grid_copy, "shallow_cnn_w32")

    assert report.main([str(grid_copy)]) == 0
    out = capsys.readouterr().out
    expected = (
        "n1 shallow_cnn_w32, n2 shallow_cnn_w16, regime true_data, N1 batch 64: 0/1 runs finished; "
        "missing seeds 0 (N2 not trained)"
    )
    assert "missing: 1 of 2 cells" in out
    assert expected in out
    assert "n1 shallow_cnn_w16," not in out, "the complete cell is listed as missing"
    missing = (grid_copy / "missing.txt").read_text()
    assert missing.startswith("missing: 1 of 2 cells\n")
    assert expected in missing
    table = (grid_copy / "table.md").read_text()
    assert "| shallow_cnn_w32 | missing (0/1 runs)" in table
    tex = (grid_copy / "table.tex").read_text()
    assert r"shallow\_cnn\_w32 & \textit{missing} (0/1)" in tex
    assert_valid_png(grid_copy / "figures" / "heatmap_learnability.png")


def test_partial_heatmap_labels_missing_cell():
    spec = TableSpec(metric="learnability", rows=("n1",), columns="n2")
    done = CellStats("table10", "cifar10", "shallow_cnn_w16", "shallow_cnn_w16", "true_data", 64, "learnability",
                     values=[60.0, 62.0], reached_target=2, paper_mean=58.81, paper_std=0.4)
    lost = CellStats("table10", "cifar10", "shallow_cnn_w32", "shallow_cnn_w16", "true_data", 64, "learnability",
                     missing=2, paper_mean=63.86, paper_std=0.06)
    figure = heatmap_figure(spec, [done, lost], "test", seeds=2)
    ours, published = [axes for axes in figure.axes if axes.get_title() in ("ours", "published")]
    assert [t.get_text() for t in ours.texts] == ["61.0\n±1.4", "missing"]
    assert [t.get_text() for t in published.texts] == ["58.8", "63.9"]


def test_copied_recipe_gets_same_figures(grid_copy):
    # A user's copy of the recipe under another name, for which no values are published.
    run = json.loads((grid_copy / "run.json").read_text())
    run["recipe_fields"]["name"] = run["recipe_fields"]["paper_table"] = "my-grid"
    (grid_copy / "run.json").write_text(json.dumps(run))

    assert report.main([str(grid_copy)]) == 0
    assert_valid_png(grid_copy / "figures" / "heatmap_learnability.png")
    tex = (grid_copy / "table.tex").read_text()
    assert "paper" not in tex.split(r"\begin{table}")[1], "a table without published values has a paper column"


def test_learning_curve_figure(data_dir, tmp_path, capsys):
    run_dir = train_tiny("learning-curve", ["--n1", "shallow_cnn_w16"], tmp_path / "run", data_dir)
    capsys.readouterr()

    assert report.main([str(run_dir)]) == 0
    assert_valid_png(run_dir / "figures" / "learning_curves.png")
    assert "missing: 0 of 7 cells" in capsys.readouterr().out


def test_learning_curve_marks_missing_epoch():
    spec = TableSpec(metric="learnability", rows=("n1",), columns="epoch")
    rows = [
        CellStats("lc", "cifar10", "shallow_cnn_w16", "shallow_cnn_w16", "true_data", 64, "learnability",
                  key=f"epoch={epoch}", values=values, reached_target=len(values))
        for epoch, values in (("1", [40.0, 44.0]), ("2", []), ("final", [50.0, 52.0]))
    ]
    figure = learning_curve_figure([spec], rows, "test")
    (axes,) = figure.axes
    labels = [line.get_label() for line in axes.get_lines()]
    assert labels == ["shallow_cnn_w16", "missing"]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["1", "2", "final"]
    assert list(axes.get_lines()[1].get_xdata()) == [1.0]


def test_seed_agreement_histogram(data_dir, tmp_path):
    run_dir = train_tiny("seed-agreement", ["--n1", "shallow_cnn_w16", "--seeds", "2"], tmp_path / "run", data_dir)
    assert report.main([str(run_dir)]) == 0
    assert_valid_png(run_dir / "figures" / "distinct_predictions.png")
    assert not (run_dir / "figures" / "heatmap_learnability.png").exists()


def test_class_share_bars(data_dir, tmp_path):
    run_dir = train_tiny("table5", ["--n1", "shallow_cnn_w16", "--regimes", "true_data"], tmp_path / "run", data_dir)
    assert report.main([str(run_dir)]) == 0
    assert_valid_png(run_dir / "figures" / "class_shares.png")
    tex = (run_dir / "table.tex").read_text()
    # The published shares sit beside ours, one pair of columns per class.
    assert r"\multicolumn{2}{c}{class=0}" in tex
    assert r"\multicolumn{2}{c}{class=9}" in tex


@pytest.mark.parametrize("case", ["no_folder", "no_run_json", "bad_json", "old_run_json", "bad_recipe"])
def test_bad_run_dir_one_line_exit_2(case, grid_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    expected = {
        "no_folder": "does not exist",
        "no_run_json": "run.json not found",
        "bad_json": "run.json is unreadable",
        "old_run_json": "has no field 'recipe_fields'",
        "bad_recipe": "unknown model 'resnet9'",
    }[case]
    if case != "no_folder":
        run_dir.mkdir()
    run = json.loads((grid_run / "run.json").read_text())
    if case == "bad_json":
        (run_dir / "run.json").write_text("{not json")
    elif case == "old_run_json":
        del run["recipe_fields"]
        (run_dir / "run.json").write_text(json.dumps(run))
    elif case == "bad_recipe":
        run["recipe_fields"]["n1"] = ["resnet9"]
        (run_dir / "run.json").write_text(json.dumps(run))

    assert report.main([str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.startswith("error: ")
    assert err.count("\n") == 1, err


def test_subprocess_error_has_no_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "engine.report", str(tmp_path / "absent")], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_split_groups_separates_colliding_regimes():
    spec = TableSpec(metric="learnability", rows=("n1",), columns="n2")
    rows = [
        CellStats("t", "cifar10", n1, "shallow_cnn_w16", regime, 64, "learnability", values=[50.0])
        for regime in ("true_data", "random_labels")
        for n1 in GRID_N1
    ]
    groups = split_groups(spec, rows)
    assert [fields for fields, _ in groups] == [{"regime": "true_data"}, {"regime": "random_labels"}]
    assert all(len(members) == 2 for _, members in groups)
    grid = layout_grid(spec, groups[1][1])
    assert grid.row_ids == [(n1,) for n1 in GRID_N1]
    assert grid.get(("shallow_cnn_w16",), "shallow_cnn_w16").regime == "random_labels"


def test_split_groups_keeps_n2_that_follows_n1():
    # Per-regime tables have N2 = N1 in every row, which must not split the table.
    spec = TableSpec(metric="learnability", rows=("n1",), columns="regime")
    rows = [CellStats("t", "cifar10", n1, n1, "true_data", 64, "learnability") for n1 in GRID_N1]
    assert split_groups(spec, rows) == [({}, rows)]


def test_latex_escape():
    assert latex_escape("shallow_cnn_w16 & 50% {x}") == r"shallow\_cnn\_w16 \& 50\% \{x\}"
