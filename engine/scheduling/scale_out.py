"""Command-line options that choose the executor: in this process, or Ray workers.

Without ``--workers``, ``--gpus`` or ``--cluster`` the run trains in this process
and Ray is never imported, so its start-up time does not touch the default path.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from engine.arguments import positive_int
from engine.errors import UsageError
from engine.experiments.jobs import DataContext
from engine.experiments.runner import Executor, InProcessExecutor
from engine.fused.trainer import FusedOptions
from engine.scheduling.gpus import parse_gpus, resolve_gpus
from engine.training.execution import ExecutionOptions


def add_scale_out_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the ``--workers``, ``--gpus`` and ``--cluster`` options in their own group."""
    group = parser.add_argument_group(
        "scale out with Ray (pip install 'learnability-engine[ray]')",
        "Train networks in parallel as Ray tasks. Each finished network is saved as it "
        "arrives, so an interrupted run resumes like a local one.",
    )
    group.add_argument(
        "--workers", type=positive_int, metavar="N",
        help="train on N CPU workers of a local Ray instance, each with (CPU cores / N) torch threads; "
             "with --cluster, N CPU tasks at once across the cluster (default: train in this process)",
    )
    group.add_argument(
        "--gpus", metavar="SPEC",
        help="train on a local Ray instance with one worker per listed GPU: "
             "ids and ranges of torch device indices such as 0-7 or 0-3,6, or all",
    )
    group.add_argument(
        "--cluster", metavar="ADDRESS",
        help="train on a running Ray cluster: auto, or the head node's HOST:6379; every node "
             "needs the dataset at the --data-dir path or in its $ENGINE_DATA_DIR",
    )
    return group


def validate_scale_out(args: argparse.Namespace) -> None:
    """Raise UsageError for contradicting scale-out options or a malformed ``--gpus``."""
    workers, gpus, cluster = args.workers, args.gpus, args.cluster
    if workers is not None and gpus is not None:
        raise UsageError(
            f"--workers {workers} starts CPU workers and --gpus {gpus} one worker per GPU; give only one of them"
        )
    if gpus is not None and cluster is not None:
        raise UsageError(
            f"--gpus {gpus} lists GPUs of this machine, but --cluster uses every GPU of the cluster's nodes; "
            "drop --gpus (limit a node's GPUs with `ray start --num-gpus N`)"
        )
    device = getattr(args, "device", "cpu")
    given = {"--workers": workers, "--gpus": gpus, "--cluster": cluster}
    scaled = [name for name, value in given.items() if value is not None]
    if scaled and device != "cpu":
        raise UsageError(
            f"--device {device} sets the device of training in this process, but with {scaled[0]} "
            "each Ray worker gets its device from Ray; drop --device"
        )
    if gpus is not None and gpus.strip().lower() != "all":
        parse_gpus(gpus)


def make_executor(
    data_dir: str | None,
    dataset: str,
    device: torch.device,
    options: FusedOptions,
    workers: int | None,
    gpus: str | None,
    cluster: str | None,
    execution: ExecutionOptions | None = None,
    **ray_options: Any,
) -> Executor:
    """Return the executor that the scale-out options ask for.

    Args:
        data_dir: dataset folder; Ray workers read it at this path.
        dataset: dataset name of the run.
        device: the device of training in this process (no Ray option given).
        options: fusion options, passed to the workers as well.
        workers: CPU workers (``--workers``).
        gpus: GPU list (``--gpus``), checked against this machine's GPUs before Ray starts.
        cluster: Ray cluster address (``--cluster``).
        execution: loader, layout, compilation, threads and autotuning, passed to the
            workers as well; None trains as a plain eager loop.
        ray_options: more keyword arguments of ``RayExecutor``, e.g. ``max_retries``.

    Returns:
        An ``InProcessExecutor`` when none of workers, gpus and cluster is given (Ray
        is not imported then), else a started ``RayExecutor``; close it with
        ``close_executor``.

    Raises:
        UsageError: a listed GPU does not exist, Ray is not installed, the cluster is
            unreachable, or more workers than CPU cores are asked for.
    """
    if workers is None and gpus is None and cluster is None:
        return InProcessExecutor(DataContext(dataset, data_dir), device, options, execution)
    gpu_ids = resolve_gpus(gpus) if gpus is not None else None
    from engine.scheduling.ray_executor import RayExecutor

    return RayExecutor(
        data_dir, dataset, options, workers=workers, gpus=gpu_ids, cluster=cluster, execution=execution,
        **ray_options,
    )


def execution_summary(executor: Executor, device: torch.device) -> dict[str, Any]:
    """Return the execution entries of the report header: device and threads, plus Ray workers."""
    summary = getattr(executor, "summary", None)
    if summary is not None:
        return summary()
    return {"device": str(device), "threads": torch.get_num_threads()}


def close_executor(executor: Executor) -> None:
    """Release what an executor holds: shut down the Ray instance a ``RayExecutor`` started."""
    close = getattr(executor, "close", None)
    if close is not None:
        close()
