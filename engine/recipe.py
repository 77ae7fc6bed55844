"""Command line: ``python -m engine.recipe NAME [options]`` runs an experiment recipe.

NAME is a recipe shipped in ``recipes/`` or the path of a recipe TOML file. The run
directory keeps every trained network, so the same command run again resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Sequence

import torch

from engine.arguments import positive_int
from engine.data.datasets import DATA_DIR_ENV, load_dataset, resolve_data_dir
from engine.data.loaders import check_loader
from engine.data.splits import REGIMES
from engine.devices import resolve_device, usable_cpus
from engine.errors import UsageError
from engine.experiments.deadline import Deadline, seconds_since_process_start
from engine.experiments.jobs import DataContext
from engine.experiments.plan import Plan, build_plan
from engine.experiments.recipes import list_recipes, load_recipe
from engine.experiments.runner import RunReport, run_plan
from engine.fused.trainer import FusedOptions
from engine.models.registry import list_models
from engine.results.report import describe_threads, describe_trainers, write_report
from engine.results.store import RunStore, atomic_write_text
from engine.scheduling import (
    WorkerLostError,
    add_scale_out_arguments,
    close_executor,
    execution_summary,
    make_executor,
    validate_scale_out,
)
from engine.scheduling.budget import BudgetPlan, format_duration, parse_budget, plan_within_budget, report_usage
from engine.training.config import TrainConfig
from engine.training.execution import ExecutionOptions, add_execution_arguments

log = logging.getLogger("engine")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}\n")


def _name_list(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing; give comma-separated names")
    return names


def build_parser() -> argparse.ArgumentParser:
    recipes = ", ".join(list_recipes()) or "(none found)"
    parser = _Parser(
        prog="python -m engine.recipe",
        description="Train the networks of a learnability experiment and print its table.",
        epilog=f"recipes: {recipes}. A path to a recipe .toml file works too.",
    )
    parser.add_argument("recipe", help="recipe name or path of a recipe .toml file")
    grid = parser.add_argument_group("grid (narrow the recipe)")
    grid.add_argument("--n1", type=_name_list, help="comma-separated N1 models, e.g. shallow_cnn_w16,shallow_cnn_w32")
    grid.add_argument("--n2", type=_name_list, help="comma-separated N2 models (default: the recipe's)")
    grid.add_argument("--regimes", type=_name_list, help=f"comma-separated data regimes ({', '.join(REGIMES)})")
    grid.add_argument("--seeds", type=positive_int, help="number of seeds, run as seeds 0..N-1 (study: 5)")
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument("--max-epochs", type=positive_int, help="epoch cap per training (default and study: 500)")
    protocol.add_argument(
        "--subset", type=positive_int,
        help="images per split: a seeded class-balanced subset of N images of each of D1, D2, D3 (default: full splits)",
    )
    protocol.add_argument(
        "--budget", metavar="DURATION",
        help="wall-clock budget of the whole run, e.g. 90s, 30m, 1.5h: calibrate this device, then train "
        "the largest class-balanced subset that fits (the full splits when they do); the stop rule is kept",
    )
    protocol.add_argument(
        "--exact-train-error", action="store_true",
        help="measure each epoch's training error with an evaluation pass (default: count the epoch's forward passes)",
    )
    run = parser.add_argument_group("execution")
    run.add_argument("--data-dir", help=f"dataset folder (default: ${DATA_DIR_ENV}, else a per-user cache folder)")
    run.add_argument("--out", help="run directory (default: runs/RECIPE)")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: cpu)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    add_scale_out_arguments(parser)
    fuse = parser.add_argument_group("fused training (shallow CNN and MLP families)")
    fuse.add_argument(
        "--group-size", type=positive_int,
        help="networks trained together in one fused step (default: the fastest measured on this device)",
    )
    fuse.add_argument("--no-fuse", action="store_true", help="train one network at a time (group size 1)")
    fuse.add_argument(
        "--share-batches", action="store_true",
        help="all members of a group see the same batch order: faster, but correlates their runs",
    )
    add_execution_arguments(parser)
    return parser


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process gets SIGTERM, so a run ends as on Ctrl-C."""


@contextlib.contextmanager
def _sigterm_interrupts():
    """Turn SIGTERM into ``Terminated`` for the block (main thread only), then restore the handler.

    Job schedulers stop a job with SIGTERM. Without a handler Python ends at once,
    without the message on how to resume and without stopping the lanes first.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _narrow_recipe(args: argparse.Namespace):
    # Recipe validates the narrowed fields again (models, regimes, seeds).
    return load_recipe(args.recipe).narrowed(n1=args.n1, n2=args.n2, regimes=args.regimes, seeds=args.seeds)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A budget counts from the start of the process: interpreter start and imports included.
    process_started = time.monotonic() - seconds_since_process_start()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # NOTE: a run stopped at the cap divides its lr by 4 every 10 epochs, down to ~1e-27
    # after 450 epochs. lr * grad then yields denormal floats, which slowed a CPU step
    # 4x in a 500-epoch run on 100 images. Flushing them changes no weight, because they
    # are far below the rounding step of any weight they would be added to.
    torch.set_flush_denormal(True)
    budget, deadline = None, None
    try:
        recipe = _narrow_recipe(args)
        _warn_unstudied_models(recipe)
        validate_scale_out(args)
        execution = ExecutionOptions.from_args(args)
        overrides = {
            "max_epochs": args.max_epochs,
            "exact_train_error": args.exact_train_error or None,
            "precision": execution.precision if execution.amp != "off" else None,
        }
        train = TrainConfig.from_dict({**recipe.train, **{k: v for k, v in overrides.items() if v is not None}})
        budget_s = _check_budget(args)
        device = resolve_device(args.device)
        execution.check_device(device, train.precision)
        check_loader(execution.loader)
        _check_cache_dir(execution.cache_dir)
        data_dir = resolve_data_dir(args.data_dir)
        load_dataset(recipe.dataset, data_dir)  # fail on missing data before anything trains
        data = DataContext(recipe.dataset, str(data_dir))
        data.split(0, args.subset)  # a subset too large for the data fails here
        if args.no_fuse and args.group_size not in (None, 1):
            raise UsageError(f"--no-fuse contradicts --group-size {args.group_size}; give only one of them")
        _check_lanes(args, execution)
        options = FusedOptions(group_size=1 if args.no_fuse else args.group_size, share_batches=args.share_batches)
        out = Path(args.out) if args.out else Path("runs") / recipe.name
        subset = args.subset
        if budget_s is not None:
            deadline = Deadline(budget_s, elapsed_s=time.monotonic() - process_started)
            log.info("budget %s: measuring this device's training speed to plan the run", format_duration(budget_s))
            budget = plan_within_budget(
                recipe, train, budget_s, device, RunStore(out) if out.is_dir() else None, data,
                options=options, spent_s=deadline.elapsed(), execution=execution,
            )
            train, subset = budget.train_config(train), budget.subset
        plan = build_plan(recipe, train, subset)
        # Starts Ray for --workers, --gpus or --cluster, after every other check passed.
        executor = make_executor(
            str(data_dir), recipe.dataset, device, options, args.workers, args.gpus, args.cluster, execution
        )
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _warn_if_protocol_changed(out, train, subset)
    store = RunStore(out)
    summary = execution_summary(executor, device)
    if args.share_batches:
        summary["shared batch order"] = "on (members of a fused group see the same batches, so their runs are correlated)"
    run_info = {
        "recipe": recipe.name,
        "recipe_fields": recipe.to_dict(),
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "train": train.to_dict(),
        "subset": subset,
        "budget": None if budget is None else budget.to_dict(),
        "execution": summary,
        "execution_options": execution.to_dict(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    atomic_write_text(out / "run.json", json.dumps(run_info, indent=1))
    if budget is not None:
        log.info("%s", budget.describe())
        atomic_write_text(out / "budget.json", json.dumps(budget.to_dict(), indent=1))
    done = sum(store.has(job.key) for job in plan.jobs)
    log.info(
        "%s: %d N1 + %d N2 networks (%d already trained) in %s",
        recipe.name, len(plan.n1_jobs), len(plan.n2_jobs), done, out,
    )
    try:
        with _sigterm_interrupts():
            report = run_plan(
                plan, store, executor, progress=not args.quiet,
                deadline=deadline,
                estimates=budget.job_seconds() if budget is not None else None,
            )
    except KeyboardInterrupt as exc:
        saved = sum(store.has(job.key) for job in plan.jobs)
        terminated = isinstance(exc, Terminated)
        stopped_by = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"\n{stopped_by}: {saved} networks are saved in {out}; run the same command to resume", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    except WorkerLostError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        close_executor(executor)
    # A run that trained nothing (all reused) keeps the record of the run that did.
    if report.trained or report.failed or not (out / "execution.json").exists():
        atomic_write_text(out / "execution.json", json.dumps(executor.describe(), indent=1))
    summary["trainers"] = describe_trainers(plan, store)
    summary["threads"] = describe_threads(plan, store) or summary.get("threads")
    # run.json now records what the stored networks trained with, as the table does.
    atomic_write_text(out / "run.json", json.dumps({**run_info, "execution": summary}, indent=1))
    _, table = write_report(plan, store, summary)
    print(table)
    log.info(
        "trained %d, reused %d, failed %d, blocked %d in %.0f s; wrote %s and %s%s",
        len(report.trained), len(report.reused), len(report.failed), len(report.blocked),
        report.wall_time_s, out / "summary.csv", out / "table.md",
        "" if budget is not None else f" (python -m engine.report {out} adds LaTeX and figures)",
    )
    if budget is not None and deadline is not None:
        _finish_budget(budget, deadline, report, plan, out)
    return 0


def _check_cache_dir(cache_dir: str | None) -> None:
    """Raise ``UsageError`` if the loaders' cache folder cannot be created or written."""
    if cache_dir is None:
        return
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(cache_dir) / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(
            f"--loader-cache {cache_dir!r} cannot be written ({exc.strerror or exc}); give a writable folder"
        ) from None


def _warn_unstudied_models(recipe) -> None:
    """Warn about each network of the recipe that the study did not train (a width typo, say)."""
    studied = set(list_models())
    for name in dict.fromkeys(recipe.n1 + recipe.n2):
        if name not in studied:
            family = name.rstrip("0123456789")
            members = ", ".join(
                sorted((m for m in studied if m.rstrip("0123456789") == family), key=lambda m: (len(m), m))
            )
            log.warning(
                "%s is not among the study's networks%s; it trains, but its cells have no published value",
                name, f" ({members})" if members else "",
            )


def _warn_if_protocol_changed(out: Path, train: TrainConfig, subset: int | None) -> None:
    """Warn when ``out`` contains networks of another subset or protocol, which this run's report omits."""
    previous_file = out / "run.json"
    if not previous_file.is_file():
        return
    try:
        previous = json.loads(previous_file.read_text())
        differences = protocol_differences(previous["subset"], TrainConfig.from_dict(previous["train"]), subset, train)
    except (OSError, ValueError, KeyError, TypeError):
        return
    if differences:
        stored = sum(1 for _ in (out / "networks").glob("*.json")) if (out / "networks").is_dir() else 0
        log.warning(
            "%s contains %d networks of another protocol (%s), so they stay on disk but this run's report does not "
            "show them; give another --out to keep both reports",
            out, stored, ", ".join(differences),
        )


def protocol_differences(
    old_subset: int | None, old: TrainConfig, subset: int | None, train: TrainConfig
) -> list[str]:
    """Return each setting that differs between two protocols, as ``"name old -> new"``."""
    differences = [f"subset {old_subset} -> {subset}"] if old_subset != subset else []
    for setting in dataclasses.fields(TrainConfig):
        before, after = getattr(old, setting.name), getattr(train, setting.name)
        if before != after:
            differences.append(f"{setting.name} {before} -> {after}")
    return differences


def _check_lanes(args: argparse.Namespace, execution: ExecutionOptions) -> None:
    """Raise ``UsageError`` when ``--lanes`` contradicts the fusion or scale-out options."""
    if args.lanes is None or args.lanes == 1:
        return
    if args.group_size not in (None, 1):
        raise UsageError(
            f"--lanes {args.lanes} trains networks one at a time in threads and contradicts "
            f"--group-size {args.group_size}; give only one of them"
        )
    if args.share_batches:
        raise UsageError(
            f"--lanes {args.lanes} trains networks one at a time in threads and contradicts --share-batches, "
            "which gives the members of a fused group one batch order; give only one of them"
        )
    if args.workers is not None or args.gpus is not None or args.cluster is not None:
        raise UsageError(
            f"--lanes {args.lanes} trains networks in threads of this process; with --workers, --gpus or "
            "--cluster each Ray task trains on its own, so drop --lanes"
        )
    cpus = usable_cpus()
    threads = execution.default_threads()
    if args.lanes * threads > cpus:
        log.warning(
            "--lanes %d with %d thread%s each runs %d threads on %d usable CPUs; the lanes will wait for each other",
            args.lanes, threads, "s" * (threads > 1), args.lanes * threads, cpus,
        )


def _check_budget(args: argparse.Namespace) -> float | None:
    """Return the ``--budget`` in seconds (None without one), or raise ``UsageError`` for a contradiction."""
    if args.budget is None:
        return None
    budget_s = parse_budget(args.budget)
    if args.subset is not None:
        raise UsageError(
            f"--budget {args.budget} chooses the subset itself and contradicts --subset {args.subset}; give only one"
        )
    if args.workers is not None or args.gpus is not None or args.cluster is not None:
        raise UsageError(
            f"--budget {args.budget} plans for training in this process; drop --workers, --gpus and --cluster, "
            "or drop --budget"
        )
    return budget_s


def _finish_budget(budget: BudgetPlan, deadline: Deadline, report: RunReport, plan: Plan, out: Path) -> None:
    """Report planned against used time and what is missing, save both in budget.json, add LaTeX and figures."""
    from engine.report import find_incomplete_cells
    from engine.report import main as write_full_report

    used_s = deadline.elapsed()
    line = report_usage(budget, used_s, len(report.not_computed))
    log.info("%s", line)
    described = {job.key: job.describe() for job in plan.jobs}
    for key in report.not_computed:
        log.info("  not computed: %s", described[key])
    incomplete, _ = find_incomplete_cells(plan, RunStore(out))
    atomic_write_text(out / "budget.json", json.dumps({
        **budget.to_dict(),
        "used_s": round(used_s, 1),
        "usage": line,
        "not_computed": [described[key] for key in report.not_computed],
        "incomplete_cells": [cell.describe() for cell in incomplete],
    }, indent=1))
    # A budgeted grid is a finished experiment: write its LaTeX table, missing.txt and figures too.
    write_full_report([str(out)])


if __name__ == "__main__":
    sys.exit(main())
