"""Train a plan's jobs as Ray tasks: on local CPU workers, one worker per GPU, or a cluster.

Each Ray task trains one unit of jobs (one network, or a fused group of networks of
one architecture) with an ``InProcessExecutor`` on its worker. The task is a Ray
generator task: it returns each network's record and predictions as soon as that
network finishes. The driver yields results in completion order, and the runner
saves each one at once, so workers need no shared filesystem. Workers read the
dataset themselves, from the driver's data directory path or from their node's
``$ENGINE_DATA_DIR``.

Failures:

- A worker process that dies (killed, out of memory, its node lost) fails its task
  with a system error, and Ray runs the task again on another worker, up to
  ``max_retries`` times. Results that the task returned before it died are not
  returned twice.
- A unit whose retries are all used up is reported at the end of ``run`` as a
  ``WorkerLostError``, after every other unit has finished and been saved. Its
  networks are not saved, so the next run trains them again.
- A Python exception in a task (a bug, or data missing on a node) is not retried.
  It cancels the other tasks and is raised in the driver.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from engine.data.datasets import DATA_DIR_ENV
from engine.devices import usable_cpus
from engine.errors import UsageError
from engine.experiments.jobs import DataContext
from engine.experiments.plan import NetworkJob
from engine.experiments.runner import InProcessExecutor, JobResult
from engine.fused.trainer import FusedOptions
from engine.results.store import compact
from engine.scheduling.gpus import cuda_index, visible_device_names
from engine.training.execution import ExecutionOptions

log = logging.getLogger(__name__)

# Result that a task yields per network: job key, record, predictions, and the
# group-size choices its worker has made so far (``GroupChoice.to_dict()``).
UnitResult = tuple[str, dict[str, Any], dict[str, np.ndarray], list[dict[str, Any]]]

DEFAULT_MAX_RETRIES = 3

# Environment of a local Ray instance that this module starts.
# NOTE: with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray (checked with 2.60) gives the
# node the loopback address, so the instance listens on 127.0.0.1 only, as it does
# on macOS. Ray reads it when ``ray`` is first imported, so it is set before that.
_LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


class WorkerLostError(RuntimeError):
    """Networks not trained because their Ray task failed on every attempt."""

    def __init__(self, jobs: Sequence[NetworkJob], max_retries: int) -> None:
        self.jobs = list(jobs)
        listed = "; ".join(job.describe() for job in self.jobs[:5])
        more = f" and {len(self.jobs) - 5} more" if len(self.jobs) > 5 else ""
        super().__init__(
            f"{len(self.jobs)} networks were not trained because their Ray worker died "
            f"on all {max_retries + 1} attempts: {listed}{more}. Every other network is saved, "
            "so running the same command again trains only these; check the Ray logs for "
            "why the workers died (out of memory is the usual cause)"
        )


@dataclass(frozen=True)
class WorkerSetup:
    """Settings that every task needs besides its jobs: data, fusion options, thread count."""

    dataset: str
    data_dir: str | None
    options: FusedOptions
    threads: int
    execution: ExecutionOptions | None = None


# ---------------------------------------------------------------- worker side

# DataContext per (dataset, data directory), kept for the life of the worker process,
# so a reused worker reads the dataset once.
_DATA_CONTEXTS: dict[tuple[str, str | None], DataContext] = {}


def _worker_data_dir(data_dir: str | None) -> str | None:
    """Return the data directory to read on this node: the driver's path, else ``$ENGINE_DATA_DIR``."""
    if data_dir is None or Path(data_dir).is_dir():
        return data_dir
    if os.environ.get(DATA_DIR_ENV):
        return os.environ[DATA_DIR_ENV]
    raise UsageError(
        f"data directory {data_dir!r} not found on Ray node {socket.gethostname()}; "
        f"copy the dataset to that path on every node, or set ${DATA_DIR_ENV} on the node "
        "before `ray start`"
    )


def _data_context(dataset: str, data_dir: str | None) -> DataContext:
    key = (dataset, data_dir)
    if key not in _DATA_CONTEXTS:
        _DATA_CONTEXTS[key] = DataContext(dataset, _worker_data_dir(data_dir))
    return _DATA_CONTEXTS[key]


def _worker_device() -> tuple[torch.device, str | None]:
    """Return this task's device and the Ray id of its GPU (None on CPU)."""
    import ray

    gpu_ids = ray.get_gpu_ids()
    if not gpu_ids:
        return torch.device("cpu"), None
    index = cuda_index(gpu_ids[0], os.environ.get("CUDA_VISIBLE_DEVICES"))
    return torch.device("cuda", index), str(gpu_ids[0])


def train_unit(
    setup: WorkerSetup, jobs: list[NetworkJob], parent_d2: Mapping[str, np.ndarray]
) -> Iterator[UnitResult]:
    """Train ``jobs`` on this Ray worker and yield each network's result as it finishes.

    Args:
        setup: dataset, data directory, fusion options and torch thread count.
        jobs: one job, or jobs that may train as one fused group.
        parent_d2: for each N2 job's key, its parent N1's predictions on D2.

    Yields:
        ``(job key, record, predictions, group-size choices)``. The record gets a
        ``worker`` entry (host, pid, Ray GPU id), and predictions are compacted to
        uint8 where they fit.
    """
    # A fixed thread count per task keeps results independent of the worker that runs
    # it. Flushing denormals matches what the command line does in its own process.
    torch.set_num_threads(setup.threads)
    torch.set_flush_denormal(True)
    device, gpu = _worker_device()
    data = _data_context(setup.dataset, setup.data_dir)
    executor = InProcessExecutor(data, device, setup.options, setup.execution)
    worker = {"host": socket.gethostname(), "pid": os.getpid(), "gpu": gpu}
    try:
        for job, record, predictions in executor.run(jobs, parent_d2):
            compacted = {name: compact(values) for name, values in predictions.items()}
            choices = [choice.to_dict() for choice in executor.choices]
            yield job.key, {**record, "worker": worker}, compacted, choices
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------- driver side


def import_ray():
    """Import Ray, or raise UsageError with the install command."""
    try:
        import ray
    except ImportError:
        raise UsageError(
            "--workers, --gpus and --cluster need Ray, which is not installed; "
            "install it with: pip install 'learnability-engine[ray]'"
        ) from None
    return ray


def start_local_ray(
    num_cpus: int, gpu_names: Sequence[str] = (), object_store_bytes: int | None = None
) -> bool:
    """Start a local Ray instance listening on 127.0.0.1, unless this process has one.

    NOTE: if this process imported ``ray`` before, the instance listens on the
    node's network address instead, because Ray has already read its settings.

    Args:
        num_cpus: CPUs the instance schedules.
        gpu_names: ``CUDA_VISIBLE_DEVICES`` entries of the GPUs it schedules.
        object_store_bytes: object store size; None keeps Ray's default (30% of memory).

    Returns:
        True if it started one (the caller then shuts it down), False if Ray was
        already initialized in this process.
    """
    if "ray" not in sys.modules:
        for name, value in _LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)
    ray = import_ray()
    if ray.is_initialized():
        log.info("using the Ray instance already running in this process")
        return False
    # Ray numbers the GPUs it schedules by the CUDA_VISIBLE_DEVICES that its node
    # processes inherit, so the listed GPUs are exported only while they start.
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpu_names:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_names)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            num_gpus=len(gpu_names),
            include_dashboard=False,
            object_store_memory=object_store_bytes,
        )
    finally:
        if gpu_names:
            if previous is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = previous
    return True


def attach_cluster(address: str) -> bool:
    """Connect to the Ray cluster at ``address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``).

    The engine package of this driver is sent to the workers (Ray ``py_modules``),
    so the nodes need only its dependencies installed (torch, numpy, numba, pooch,
    tqdm), all of the driver's versions.

    Returns:
        True if it connected (the caller then disconnects), False if Ray was already
        initialized in this process.
    """
    ray = import_ray()
    if ray.is_initialized():
        log.info("using the Ray instance already running in this process")
        return False
    import engine

    runtime_env = {"py_modules": [str(Path(engine.__file__).parent)], "excludes": ["__pycache__"]}
    try:
        ray.init(address=address, runtime_env=runtime_env)
    except ConnectionError as exc:
        raise UsageError(
            f"could not connect to the Ray cluster at --cluster {address} ({exc}); start one with "
            "`ray start --head` and pass its HOST:6379 (if it uses token authentication, also set "
            "RAY_AUTH_MODE=token), or use --workers N for a local instance"
        ) from None
    return True


@dataclass(frozen=True)
class _Node:
    host: str
    address: str
    cpus: int
    gpus: int


def _alive_nodes() -> list[_Node]:
    import ray

    nodes = []
    for node in ray.nodes():
        if node.get("Alive"):
            resources = node.get("Resources", {})
            nodes.append(_Node(
                node.get("NodeManagerHostname", "?"), node.get("NodeManagerAddress", "?"),
                int(resources.get("CPU", 0)), int(resources.get("GPU", 0)),
            ))
    return nodes


def _cluster_layout(nodes: Sequence[_Node], workers: int | None, address: str) -> tuple[int, int, int]:
    """Return ``(threads per task, GPUs per task, tasks at once)`` on a cluster.

    With GPUs and no ``workers``: one task per GPU, each with the CPUs per GPU of
    the node that has the fewest. Without GPUs: one task per node's worth of
    threads of the smallest node. With ``workers``: that many CPU tasks, the
    cluster's CPUs shared equally.
    """
    cpu_nodes = [node for node in nodes if node.cpus >= 1]
    if not cpu_nodes:
        raise UsageError(f"the Ray cluster at {address} has no node with a CPU; check `ray status`")
    gpu_nodes = [node for node in cpu_nodes if node.gpus >= 1]
    if workers is None and gpu_nodes:
        threads = min(max(1, node.cpus // node.gpus) for node in gpu_nodes)
        return threads, 1, sum(node.gpus for node in gpu_nodes)
    if workers is None:
        threads = min(node.cpus for node in cpu_nodes)
        return threads, 0, sum(node.cpus // threads for node in cpu_nodes)
    total = sum(node.cpus for node in cpu_nodes)
    threads = total // workers
    largest = max(node.cpus for node in cpu_nodes)
    if threads < 1:
        raise UsageError(
            f"--workers {workers} exceeds the {total} CPUs of the Ray cluster at {address}; "
            f"give at most {total}"
        )
    if threads > largest:
        raise UsageError(
            f"--workers {workers} gives each worker {threads} CPUs, but the largest node of the "
            f"Ray cluster at {address} has {largest}; give at least {-(-total // largest)} workers"
        )
    return threads, 0, workers


def plan_units(jobs: Sequence[NetworkJob], group_size: int | None, slots: int) -> list[list[NetworkJob]]:
    """Split jobs into the units that Ray tasks train.

    ``group_size`` 1 gives one job per unit. Otherwise the jobs are bucketed by what a
    fused group shares (model, dataset, batch size, precision), and jobs with
    checkpoints get a unit each. A bucket is split into balanced units of at most
    ``group_size`` jobs. With ``group_size`` None it is split into ``slots`` units, so
    that every task slot gets one, and the worker measures the group size within its
    unit, as the in-process executor does.
    """
    if group_size == 1:
        return [[job] for job in jobs]
    buckets: dict[tuple, list[NetworkJob]] = {}
    for job in jobs:
        if getattr(job, "checkpoints", ()):
            key: tuple = ("checkpointed", job.key)  # trained one by one, like the in-process executor does
        else:
            key = (job.model, job.dataset, job.train.batch_size, job.train.precision)
        buckets.setdefault(key, []).append(job)
    units: list[list[NetworkJob]] = []
    for bucket in buckets.values():
        count = -(-len(bucket) // group_size) if group_size is not None else min(len(bucket), max(1, slots))
        units.extend(_split_evenly(bucket, count))
    return units


def _split_evenly(jobs: list[NetworkJob], count: int) -> list[list[NetworkJob]]:
    """Split into ``count`` consecutive chunks whose lengths differ by at most one."""
    base, extra = divmod(len(jobs), count)
    chunks, start = [], 0
    for i in range(count):
        end = start + base + (1 if i < extra else 0)
        chunks.append(jobs[start:end])
        start = end
    return chunks


@dataclass
class _UnitStream:
    """The jobs of one submitted task and the keys its stream has returned."""

    jobs: dict[str, NetworkJob]
    received: set[str] = field(default_factory=set)

    def missing(self) -> list[NetworkJob]:
        return [job for key, job in self.jobs.items() if key not in self.received]


class RayExecutor:
    """Train jobs as Ray tasks on local CPU workers, local GPUs or a Ray cluster.

    Give one of ``workers`` (CPU workers on a local instance), ``gpus`` (one worker
    per listed GPU on a local instance) or ``cluster`` (attach to a running cluster).
    With ``cluster``, ``workers`` may also be given, and sets how many CPU tasks run
    at once. Ray starts in the constructor. ``close()``, or leaving a ``with`` block,
    shuts it down if this executor started it or connected to it.

    Args:
        data_dir: dataset folder, read by every worker at this path (else its node's
            ``$ENGINE_DATA_DIR``); None lets each node resolve its own.
        dataset: dataset name of the jobs.
        options: fusion options; ``group_size`` 1 sends one network per task.
        workers: CPU tasks at once; on a local instance each gets
            ``usable_cpus() // workers`` CPUs and as many torch threads.
        gpus: torch device indices of the local GPUs to use, each one task at once
            with ``usable_cpus() // len(gpus)`` threads. Checked to exist by
            ``engine.scheduling.gpus.resolve_gpus``.
        cluster: Ray address: ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``.
        max_retries: times Ray runs a task again after its worker died.
        object_store_bytes: object store size of a local instance (None: Ray's default).
        train_fn: the generator function each task runs; None runs ``train_unit``.
        execution: loader, layout, compilation and autotuning of every task; its
            thread count is the task's, so autotuning never changes it. None trains
            as a plain eager loop.
    """

    def __init__(
        self,
        data_dir: str | None,
        dataset: str,
        options: FusedOptions | None = None,
        *,
        workers: int | None = None,
        gpus: Sequence[int] | None = None,
        cluster: str | None = None,
        max_retries: int = DEFAULT_MAX_RETRIES,
        object_store_bytes: int | None = None,
        train_fn: Callable[..., Iterator[UnitResult]] | None = None,
        execution: ExecutionOptions | None = None,
    ) -> None:
        if workers is not None and gpus is not None:
            raise UsageError("give workers or gpus, not both")
        if gpus is not None and cluster is not None:
            raise UsageError("gpus lists GPUs of this machine and cannot be combined with a cluster")
        if workers is None and gpus is None and cluster is None:
            raise UsageError("RayExecutor needs workers, gpus or cluster")
        if workers is not None and workers < 1:
            raise UsageError(f"--workers {workers} must be at least 1")
        if gpus is not None and not gpus:
            raise UsageError("--gpus lists no GPU; give ids such as 0-3, or all")
        self.data_dir = data_dir
        self.dataset = dataset
        self.options = options or FusedOptions()
        self.max_retries = max_retries
        self.gpus = list(gpus) if gpus is not None else None
        self.cluster = cluster
        self._train_fn = train_fn if train_fn is not None else train_unit
        self._remote: Any = None
        self._owns_ray = False
        self._networks_by_worker: Counter[str] = Counter()
        self._choices: dict[str, dict[str, Any]] = {}
        self._lost: list[str] = []
        self._units = 0

        if cluster is not None:
            self.mode = "cluster"
            self._start_on_cluster(cluster, workers)
        elif gpus is not None:
            self.mode = "local GPUs"
            self._start_on_local_gpus(list(gpus), object_store_bytes)
        else:
            self.mode = "local CPU workers"
            self._start_on_local_cpus(workers, object_store_bytes)
        self._started_ray = self._owns_ray
        # The task's thread count is fixed, so a result does not depend on the worker.
        self.execution = None if execution is None else dataclasses.replace(execution, threads=self.threads, lanes=1)
        self._setup = WorkerSetup(dataset, data_dir, self.options, self.threads, self.execution)
        log.info(
            "Ray (%s): %d tasks at once; per task: %d torch threads, %d GPU, up to %d retries",
            self.mode, self.slots, self.threads, self._gpus_per_task, max_retries,
        )

    def _start_on_cluster(self, address: str, workers: int | None) -> None:
        self._owns_ray = attach_cluster(address)
        self.nodes = _alive_nodes()
        try:
            self.threads, self._gpus_per_task, self.slots = _cluster_layout(self.nodes, workers, address)
        except UsageError:
            self.close()
            raise

    def _start_on_local_gpus(self, gpus: list[int], object_store_bytes: int | None) -> None:
        cpus = usable_cpus()
        self.threads, self._gpus_per_task, self.slots = max(1, cpus // len(gpus)), 1, len(gpus)
        num_cpus = max(cpus, self.threads * len(gpus))
        self._owns_ray = start_local_ray(num_cpus, visible_device_names(gpus), object_store_bytes)
        self.nodes = _alive_nodes()

    def _start_on_local_cpus(self, workers: int, object_store_bytes: int | None) -> None:
        cpus = usable_cpus()
        if workers > cpus:
            raise UsageError(
                f"--workers {workers} exceeds the {cpus} CPU cores of this machine; give at most {cpus}"
            )
        self.threads, self._gpus_per_task, self.slots = cpus // workers, 0, workers
        self._owns_ray = start_local_ray(cpus, (), object_store_bytes)
        self.nodes = _alive_nodes()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut down the Ray instance this executor started, or disconnect from its cluster."""
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False

    def _remote_function(self) -> Any:
        if self._remote is None:
            import ray

            # NOTE: Ray gives a task that needs a GPU a fresh worker process each time
            # (max_calls=1 by default), so GPU memory is released between tasks. The
            # cost is a process start and a dataset read per task.
            self._remote = ray.remote(
                num_cpus=self.threads, num_gpus=self._gpus_per_task, max_retries=self.max_retries,
            )(self._train_fn)
        return self._remote

    def run(self, jobs: list[NetworkJob], parent_d2: Mapping[str, np.ndarray]) -> Iterator[JobResult]:
        """Submit every job as Ray tasks and yield ``(job, record, predictions)`` as each finishes.

        Raises:
            WorkerLostError: after all other results, if some task failed on every attempt.
            Exception: the exception of a task that raised, re-raised at once.
        """
        if not jobs:
            return
        import ray
        from ray.exceptions import RayError, RayTaskError

        remote = self._remote_function()
        streams: dict[Any, _UnitStream] = {}
        for unit in plan_units(jobs, self.options.group_size, self.slots):
            parents = {job.key: parent_d2[job.key] for job in unit if job.key in parent_d2}
            streams[remote.remote(self._setup, unit, parents)] = _UnitStream({job.key: job for job in unit})
        self._units += len(streams)
        pending = list(streams)
        lost: list[NetworkJob] = []
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for stream in ready:
                    unit = streams[stream]
                    try:
                        key, record, predictions, choices = ray.get(next(stream))
                    except StopIteration:
                        lost.extend(self._report_short_stream(unit))
                        continue
                    except RayTaskError as exc:
                        raise exc.as_instanceof_cause() from None
                    except RayError as exc:
                        keys = ", ".join(unit.jobs)
                        log.error("Ray task for networks %s failed on every attempt: %s", keys, exc)
                        lost.extend(unit.missing())
                        continue
                    pending.append(stream)
                    if key in unit.received:
                        # A retried task returned a network that its first attempt had already returned.
                        log.warning("ignoring a second result for network %s from a retried task", key)
                        continue
                    unit.received.add(key)
                    self._note_result(record, choices)
                    yield unit.jobs[key], record, predictions
        finally:
            for stream in pending:
                ray.cancel(stream, force=True)
        if lost:
            self._lost.extend(job.key for job in lost)
            raise WorkerLostError(lost, self.max_retries)

    def _report_short_stream(self, unit: _UnitStream) -> list[NetworkJob]:
        # NOTE: Ray replays a retried generator task and returns only the results past
        # those already returned. If a replay finishes networks in another order, a
        # network can be returned twice and another never, and that one counts as lost.
        missing = unit.missing()
        if missing:
            keys = ", ".join(job.key for job in missing)
            log.error("a Ray task ended without returning networks %s", keys)
        return missing

    def _note_result(self, record: dict[str, Any], choices: list[dict[str, Any]]) -> None:
        worker = record.get("worker", {})
        place = worker.get("host", "?")
        place += " CPU" if worker.get("gpu") is None else f" GPU {worker['gpu']}"
        self._networks_by_worker[place] += 1
        for choice in choices:
            self._choices[repr(sorted(choice.items()))] = choice

    def summary(self) -> dict[str, Any]:
        """Return the short execution entries of a report header: device, threads, workers."""
        device = "cuda" if self._gpus_per_task else "cpu"
        if self.mode == "cluster":
            where = f"Ray cluster {self.cluster}"
        elif self.gpus is not None:
            where = "local Ray, GPUs " + ",".join(map(str, self.gpus))
        else:
            where = "local Ray"
        return {"device": f"{device} ({where})", "threads": self.threads, "workers": self.slots}

    def describe(self) -> dict[str, Any]:
        """Return what ran where: the Ray layout, its nodes and the networks per worker."""
        import ray

        return {
            "executor": "ray",
            "ray": ray.__version__,
            "mode": self.mode,
            "cluster": self.cluster,
            "ray_initialized_here": self._started_ray,
            "gpus": self.gpus,
            "tasks_at_once": self.slots,
            "threads_per_task": self.threads,
            "gpus_per_task": self._gpus_per_task,
            "max_retries": self.max_retries,
            "fused": self.options.to_dict(),
            "execution": None if self.execution is None else self.execution.to_dict(),
            "units_submitted": self._units,
            "nodes": [vars(node) for node in self.nodes],
            "networks_by_worker": dict(sorted(self._networks_by_worker.items())),
            "group_choices": list(self._choices.values()),
            "lost": list(self._lost),
        }
