"""The autotune cache file: where it lives, how entries are read back, and how they are written.

The file maps a measurement key (device, threads, PyTorch, architecture, input,
batch size, precision) to an entry:

- ``images_per_s``: training images/s per candidate label;
- ``compile_s``: compilation seconds per compiled candidate label;
- ``failed``: the error per candidate whose compilation or step raised;
- ``timed_s``: the seconds each speed was timed for;
- ``lanes``: per layout, lanes sessions (``lanes``: images/s of the lanes,
  ``one network``: images/s per one-network label, ``timed_s``);
- ``groups``: per batch mode (``shared`` or ``independent``), fused training
  images/s per group size.

The file is shared by all runs of a user, and it may be edited or truncated by
hand, so ``clean_entry`` keeps only well-typed, finite values. What it drops is
timed again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
from pathlib import Path
from typing import Any, Sequence

import pooch
import torch
from torch import nn

try:
    import fcntl
except ImportError:  # fcntl is missing on Windows, where writers are not serialized
    fcntl = None

log = logging.getLogger(__name__)

CACHE_ENV = "ENGINE_AUTOTUNE_CACHE"
# Mode of a newly created cache file (mkstemp would leave 0600).
NEW_FILE_MODE = 0o644
# Seconds per candidate that speeds cached before timings were recorded were timed for.
LEGACY_TIMED_S = 0.3


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """Return a name of the device's hardware: the GPU name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    return f"{cpu} x{os.cpu_count()}"


def architecture_name(model: nn.Module) -> str:
    """Return the model's class and a hash of its parameter shapes: equal for equal architectures."""
    shapes = ";".join(f"{name}:{tuple(p.shape)}" for name, p in model.named_parameters())
    return f"{type(model).__name__}-{hashlib.sha1(shapes.encode()).hexdigest()[:10]}"


def cache_key(
    architecture: str, input_shape: Sequence[int], batch_size: int, precision: str, device: torch.device
) -> str:
    """Return the key of one measurement: hardware, threads, PyTorch, architecture, input, batch, precision."""
    threads = f"threads={torch.get_num_threads()}" if device.type == "cpu" else device.type
    shape = "x".join(str(d) for d in input_shape)
    return f"{device_name(device)}|{threads}|torch={torch.__version__}|{architecture}|{shape}|b{batch_size}|{precision}"


def cache_path() -> Path:
    """Return the autotune cache file: ``$ENGINE_AUTOTUNE_CACHE``, else one in the per-user cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(pooch.os_cache("learnability-engine")) / "autotune.json"


def cache_file(cache: Path | str | None | bool) -> Path | None:
    """Return the file a ``cache`` argument names: None or True the default file, False none, else the path."""
    if cache is False:
        return None
    if cache is None or cache is True:
        return cache_path()
    return Path(cache)


def read_entry(path: Path | None, key: str) -> dict[str, Any]:
    """Return the cleaned entry under ``key`` of the cache file (see ``clean_entry``), empty without a file."""
    return clean_entry(load_cache(path).get(key)) if path is not None else {}


def load_cache(path: Path) -> dict[str, Any]:
    """Return the cache file's entries; a missing or unreadable file gives none (logged)."""
    try:
        with open(path, encoding="utf-8") as file:
            entries = json.load(file)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        # ValueError covers malformed JSON and text that is not UTF-8.
        log.warning("ignoring the unreadable autotune cache %s: %s", path, exc)
        return {}
    return entries if isinstance(entries, dict) else {}


def save_entry(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Write one entry into the cache file, keeping the others.

    The file is replaced atomically. On POSIX systems, a lock file beside it
    serializes writers, so concurrent runs keep each other's entries. A symbolic
    link is written through to its target. A path that exists but is not a regular
    file is left alone, with a warning.
    """
    target = Path(path).resolve()
    if target.exists() and not target.is_file():
        log.warning("not writing the autotune cache: %s is not a regular file; set %s to a file path", path, CACHE_ENV)
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target):
            entries = load_cache(target)
            entries[key] = entry
            mode = target.stat().st_mode & 0o777 if target.exists() else NEW_FILE_MODE
            handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".partial")
            try:
                with os.fdopen(handle, "w", encoding="utf-8") as file:
                    json.dump(entries, file, indent=1, sort_keys=True)
                os.chmod(partial, mode)
                os.replace(partial, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(partial)
                raise
    except OSError as exc:
        log.warning("could not write the autotune cache %s: %s", path, exc)


@contextlib.contextmanager
def _locked(target: Path):
    """Hold an exclusive lock on ``target``'s lock file for the block (no lock without fcntl)."""
    if fcntl is None:
        yield
        return
    with open(target.with_name(target.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def seconds(value: Any) -> float:
    """Return a cached timing in seconds. Anything but a finite non-negative number counts as 0, so it is timed again."""
    if _number(value) and value >= 0:
        return float(value)
    return 0.0


def clean_entry(raw: Any, untimed_s: float = LEGACY_TIMED_S) -> dict[str, Any]:
    """Return a cache entry with only well-typed values. What it drops is timed again.

    Speeds must be finite and positive, compile seconds finite and non-negative,
    and failures text. A speed without a recorded timing was cached before timings
    were recorded, and counts as timed for ``untimed_s``. A ``timed_s`` that is not
    a map counts as no timing at all.
    """
    if not isinstance(raw, dict):
        return {}
    speeds = _numbers(raw.get("images_per_s"), lambda v: v > 0)
    timed = raw.get("timed_s", {})
    timed_s = {label: seconds(timed.get(label, untimed_s)) if isinstance(timed, dict) else 0.0 for label in speeds}
    failed = raw.get("failed")
    entry = {
        "images_per_s": speeds,
        "compile_s": _numbers(raw.get("compile_s"), lambda v: v >= 0),
        "failed": {str(k): str(v) for k, v in failed.items()} if isinstance(failed, dict) else {},
        "timed_s": timed_s,
        "lanes": {},
    }
    lanes = raw.get("lanes")
    for layout, sessions in (lanes.items() if isinstance(lanes, dict) else ()):
        if isinstance(sessions, dict):
            entry["lanes"][str(layout)] = {
                str(name): session for name, session in sessions.items() if _usable_session(session)
            }
    groups = raw.get("groups")
    entry["groups"] = {
        str(mode): {str(g): float(v) for g, v in speeds.items() if _group_size(g) and _number(v) and v > 0}
        for mode, speeds in (groups.items() if isinstance(groups, dict) else ())
        if isinstance(speeds, dict)
    }
    if isinstance(raw.get("updated"), str):
        entry["updated"] = raw["updated"]
    return entry


def _group_size(text: Any) -> bool:
    """Return whether a cached group size (a map key) is a positive whole number."""
    return isinstance(text, str) and text.isdigit() and int(text) >= 1


def session_timed_s(session: dict[str, Any], untimed_s: float) -> float:
    """Return how long a cleaned lanes session was timed (``untimed_s`` for one cached before timings were recorded)."""
    return seconds(session.get("timed_s", untimed_s))


def _usable_session(session: Any) -> bool:
    """Return whether a cached lanes session has a lanes speed and one-network speeds to compare."""
    if not isinstance(session, dict):
        return False
    alone = session.get("one network")
    return (
        _number(session.get("lanes"))
        and session["lanes"] > 0
        and isinstance(alone, dict)
        and bool(alone)
        and all(_number(v) and v > 0 for v in alone.values())
    )


def _number(value: Any) -> bool:
    """Return whether ``value`` is a finite int or float (a bool is not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(raw: Any, keep) -> dict[str, float]:
    """Return the finite numbers of the map ``raw`` that pass ``keep``. Anything but a map gives none."""
    if not isinstance(raw, dict):
        return {}
    return {str(k): float(v) for k, v in raw.items() if _number(v) and keep(v)}
