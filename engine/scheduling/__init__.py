"""Scale out: train a plan's networks as Ray tasks on CPU workers, GPUs or a cluster.

``make_executor`` returns the in-process executor unless ``--workers``, ``--gpus`` or
``--cluster`` is given. Ray itself is imported only when a ``RayExecutor`` starts.
"""

from engine.scheduling.gpus import parse_gpus, resolve_gpus
from engine.scheduling.ray_executor import RayExecutor, WorkerLostError
from engine.scheduling.scale_out import (
    add_scale_out_arguments,
    close_executor,
    execution_summary,
    make_executor,
    validate_scale_out,
)

__all__ = [
    "RayExecutor",
    "WorkerLostError",
    "add_scale_out_arguments",
    "close_executor",
    "execution_summary",
    "make_executor",
    "parse_gpus",
    "resolve_gpus",
    "validate_scale_out",
]
