"""Parse ``--gpus`` lists and map GPU ids to CUDA device indices.

A GPU id is a torch device index on the driver's machine: ``--gpus 2`` is the GPU
that ``--device cuda:2`` would use, also when ``CUDA_VISIBLE_DEVICES`` renumbers
the machine's GPUs.
"""

from __future__ import annotations

import os
import re

from engine.errors import UsageError

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def parse_gpus(spec: str, available: int | None = None) -> list[int]:
    """Parse a GPU list such as ``0-3,6``, ``2``, ``0,1`` or ``all`` into sorted ids.

    Args:
        spec: comma-separated ids and inclusive ranges ``A-B``, or ``all``.
        available: GPUs on this machine, needed for ``all`` only; None counts them
            with ``torch.cuda.device_count()``.

    Raises:
        UsageError: the text is malformed, a range is reversed, an id is listed
            twice, or ``all`` finds no GPU.
    """
    text = spec.strip().lower()
    if text == "all":
        if available is None:
            available = _cuda_device_count()
        if available == 0:
            raise UsageError(
                "--gpus all: this machine has no CUDA GPU; "
                "drop --gpus to train in this process, or use --workers N for CPU workers"
            )
        return list(range(available))

    ids: list[int] = []
    for part in text.split(","):
        match = _RANGE.fullmatch(part.strip())
        if match is None:
            raise UsageError(
                f"invalid --gpus {spec!r}: {part.strip()!r} is not a GPU id or range; "
                "give ids and ranges such as 0-3,6, or all"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise UsageError(f"invalid --gpus {spec!r}: range {part.strip()!r} is reversed; write {last}-{first}")
        for gpu in range(first, last + 1):
            if gpu in ids:
                raise UsageError(f"invalid --gpus {spec!r}: GPU {gpu} is listed twice")
            ids.append(gpu)
    return sorted(ids)


def check_gpus_exist(ids: list[int], spec: str, available: int | None = None) -> None:
    """Raise UsageError unless every id in ``ids`` is a CUDA device of this machine.

    ``available`` defaults to ``torch.cuda.device_count()``.
    """
    if available is None:
        available = _cuda_device_count()
    missing = [gpu for gpu in ids if gpu >= available]
    if not missing:
        return
    names = ", ".join(map(str, missing))
    noun = "GPU" if len(missing) == 1 else "GPUs"
    if available == 0:
        raise UsageError(
            f"--gpus {spec}: {noun} {names} not found, this machine has no CUDA GPU; "
            "drop --gpus to train in this process, or use --workers N for CPU workers"
        )
    raise UsageError(
        f"--gpus {spec}: {noun} {names} not found, this machine has {available} CUDA GPUs "
        f"(0-{available - 1}); list only those, e.g. --gpus 0-{available - 1} or --gpus all"
    )


def resolve_gpus(spec: str) -> list[int]:
    """Parse ``spec`` and check that its GPUs exist; see ``parse_gpus``."""
    available = _cuda_device_count()
    ids = parse_gpus(spec, available)
    check_gpus_exist(ids, spec, available)
    return ids


def visible_device_names(ids: list[int], visible: str | None = None) -> list[str]:
    """Return the ``CUDA_VISIBLE_DEVICES`` entries of the torch device indices ``ids``.

    ``visible`` defaults to this process's ``CUDA_VISIBLE_DEVICES``. With it unset,
    index i is physical GPU i. Entries may be numbers or UUIDs; both are returned
    as written.
    """
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(gpu) for gpu in ids]
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    return [entries[gpu] for gpu in ids]


def cuda_index(gpu_id: str | int, visible: str | None) -> int:
    """Return the torch device index of a GPU that Ray assigned to this worker.

    Ray names a GPU by its ``CUDA_VISIBLE_DEVICES`` entry on the node. By default it
    narrows the worker's ``CUDA_VISIBLE_DEVICES`` to that entry, so the index is 0.
    With ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` set, every GPU of the node is
    visible to the worker, and the index is the entry's position.
    """
    if visible is None:
        return int(gpu_id)
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    try:
        return entries.index(str(gpu_id))
    except ValueError:
        raise RuntimeError(
            f"Ray assigned GPU {gpu_id!r}, which is not in CUDA_VISIBLE_DEVICES={visible!r}"
        ) from None


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()
