"""Command line: ``python -m engine.report RUN_DIR`` rewrites a run's report without training.

It rebuilds the run's plan from ``RUN_DIR/run.json`` and reads the stored
networks, then writes ``summary.csv`` and ``table.md`` (as ``python -m
engine.recipe`` does), ``table.tex``, ``missing.txt`` and PNG figures under
``RUN_DIR/figures/``. A run that is still going or was stopped gets a report of
what finished, with every cell that lacks runs listed as missing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from engine.errors import UsageError
from engine.experiments.plan import Plan, build_plan
from engine.experiments.recipes import Recipe
from engine.results.latex import render_latex
from engine.results.report import describe_threads, describe_trainers, report_paths, write_report
from engine.results.store import RunStore
from engine.training.config import TrainConfig

RUN_FILE = "run.json"
REWRITE_HINT = "rewrite it by running `{command}` again, which reuses the trained networks"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m engine.report",
        description=(
            "Rewrite summary.csv and table.md of a run from its stored networks, without training, "
            "and add table.tex, missing.txt and PNG figures."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of a `python -m engine.recipe` run")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only, no PNG figures")
    return parser


@dataclass(frozen=True)
class IncompleteCell:
    """A cell of the plan with seeds whose networks are not trained yet or failed."""

    n1: str
    n2: str
    regime: str
    n1_batch_size: int
    epoch: int | None
    seeds: int
    missing: dict[int, str]  # seed -> the untrained networks, e.g. "N2"
    failed: tuple[int, ...]

    def describe(self) -> str:
        """Return one line: the cell's fields, then its missing and failed seeds."""
        parts = [f"n1 {self.n1}"]
        if self.n2:
            parts.append(f"n2 {self.n2}")
        parts += [f"regime {self.regime}", f"N1 batch {self.n1_batch_size}"]
        if self.epoch is not None:
            parts.append(f"N1 epoch {self.epoch}")
        problems = []
        if self.missing:
            by_roles: dict[str, list[str]] = {}
            for seed, roles in sorted(self.missing.items()):
                by_roles.setdefault(roles, []).append(str(seed))
            seeds = ", ".join(f"{', '.join(numbers)} ({roles} not trained)" for roles, numbers in by_roles.items())
            problems.append(f"missing seeds {seeds}")
        if self.failed:
            problems.append(f"failed seeds {', '.join(map(str, self.failed))}")
        finished = self.seeds - len(self.missing) - len(self.failed)
        return f"{', '.join(parts)}: {finished}/{self.seeds} runs finished; {'; '.join(problems)}"


def find_incomplete_cells(plan: Plan, store: RunStore) -> tuple[list[IncompleteCell], int]:
    """List the plan's cells with untrained or failed networks, and count all cells.

    A cell is one (N1, N2, regime, N1 batch size, checkpoint) over all seeds. A seed
    is missing where a network of it has no record, and failed where a record's
    status is not "ok".
    """
    records: dict[str, dict | None] = {}

    def status(key: str) -> str | None:
        if key not in records:
            records[key] = store.record(key) if store.has(key) else None
        record = records[key]
        return None if record is None else record["status"]

    groups: dict[tuple, tuple[dict[int, str], list[int]]] = {}
    for cell in plan.cells:
        index = (cell.n1, cell.n2, cell.regime, cell.n1_batch_size, cell.epoch)
        missing, failed = groups.setdefault(index, ({}, []))
        networks = [("N1", cell.n1_key)] + ([("N2", cell.n2_key)] if cell.n2_key is not None else [])
        statuses = {role: status(key) for role, key in networks}
        if any(value is not None and value != "ok" for value in statuses.values()):
            failed.append(cell.seed)
        elif None in statuses.values():
            missing[cell.seed] = ", ".join(role for role, value in statuses.items() if value is None)
    incomplete = [
        IncompleteCell(*index, seeds=plan.recipe.seeds, missing=missing, failed=tuple(failed))
        for index, (missing, failed) in groups.items()
        if missing or failed
    ]
    return incomplete, len(groups)


def missing_report(incomplete: list[IncompleteCell], total: int) -> str:
    """Render ``missing: N of M cells`` and one line per incomplete cell."""
    noun = "cell" if total == 1 else "cells"
    lines = [f"missing: {len(incomplete)} of {total} {noun}"]
    lines += [f"  {cell.describe()}" for cell in incomplete]
    return "\n".join(lines) + "\n"


def _rerun_command(run: dict[str, Any], run_dir: Path) -> str:
    """Return the command that made the run, as far as run.json still names it."""
    argv = run.get("argv")
    if isinstance(argv, list) and argv and all(isinstance(arg, str) for arg in argv):
        return "python -m engine.recipe " + shlex.join(argv)
    return "python -m engine.recipe " + shlex.join([str(run.get("recipe", "RECIPE")), "--out", str(run_dir)])


def load_run(run_dir: Path) -> tuple[Plan, dict[str, Any], str]:
    """Rebuild the plan and execution details saved in ``run_dir/run.json``.

    Also returns the command that made the run, for error messages.

    Raises:
        UsageError: the folder or its run.json is missing, or run.json is unreadable.
    """
    if not run_dir.is_dir():
        raise UsageError(f"run directory '{run_dir}' does not exist; give the --out folder of a recipe run")
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise UsageError(
            f"{path} not found; give the --out folder of a `python -m engine.recipe` run, "
            "which writes run.json when it starts"
        )
    try:
        run = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        hint = REWRITE_HINT.format(command=_rerun_command({}, run_dir))
        raise UsageError(f"{path} is unreadable ({exc}); {hint}") from None
    if not isinstance(run, dict):
        hint = REWRITE_HINT.format(command=_rerun_command({}, run_dir))
        raise UsageError(f"{path} is not a run record (a JSON object); {hint}")
    command = _rerun_command(run, run_dir)
    hint = REWRITE_HINT.format(command=command)
    try:
        recipe = Recipe.from_dict(run["recipe_fields"])
        train = TrainConfig.from_dict(run["train"])
        plan = build_plan(recipe, train, run["subset"])
        execution = dict(run["execution"])
    except KeyError as exc:
        raise UsageError(f"{path} has no field {exc}, so it was written by an older version; {hint}") from None
    except (UsageError, TypeError, ValueError) as exc:
        raise UsageError(f"{path} is not a valid run record ({exc}); {hint}") from None
    return plan, execution, command


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        plan, execution, command = load_run(run_dir)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    store = RunStore(run_dir)
    try:
        # run.json is written before training, so it lacks the trainers that table.md names.
        execution.setdefault("trainers", describe_trainers(plan, store))
        execution["threads"] = describe_threads(plan, store) or execution.get("threads")
        rows, _ = write_report(plan, store, execution)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        print(
            f"error: reading the stored networks in {store.networks} failed ({exc!r}); delete the damaged "
            f"network's .json and .npz, then run `{command}` to train it again",
            file=sys.stderr,
        )
        return 1
    written = list(report_paths(store))
    written.append(store.write_text("table.tex", render_latex(plan, rows, execution)))

    incomplete, total = find_incomplete_cells(plan, store)
    missing = missing_report(incomplete, total)
    written.append(store.write_text("missing.txt", missing))

    if not args.no_figures:
        from engine.results.figures import write_figures  # matplotlib loads only when drawing

        figures = write_figures(plan, rows, run_dir / "figures")
        if not figures:
            print(
                f"no figures for {plan.recipe.name}: figures are drawn for N1 x N2 grids, learning curves, "
                "distinct-prediction histograms and class shares"
            )
        written += figures
    print(missing, end="")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
