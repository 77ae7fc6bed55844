"""The GPU-relevant speed measurements in one script: ``python benchmarks/gpu_benchmarks.py OUTDIR``.

Writes ``OUTDIR/gpu_benchmarks.json`` after every section, so a run cut short still
leaves what it measured. Sections, in order:

1. ``fused``: training images/s of 35 shallow CNNs of width 16 at batch 64, fused
   (independent and shared batches) against one by one.
2. ``compile``: images/s and first-step seconds (compilation included) of the
   shallow CNN at widths 16 and 128 for every compile mode and both layouts
   (``max-autotune`` only at width 16 in NCHW: it compiles for minutes).
3. ``amp``: images/s at fp32, bf16 and fp16 autocast, eager and compiled with
   ``reduce-overhead``, NCHW and channels_last.
4. ``loaders``: images/s of one epoch over 25,000 CIFAR-sized images per loader
   backend (the extras that are not installed are recorded as skipped).

On a CUDA machine the whole script is sized to finish in under 8 minutes. Each
section starts no new case once its share of the time is spent, and records the
cases it skipped. On a
machine without CUDA it runs a tiny CPU version (small widths, short timings, no
CUDA-only modes) to check that it works, and records ``"tiny": true``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from engine.data.loaders import make_loader  # noqa: E402
from engine.fused.strategy import measure_throughput  # noqa: E402
from engine.models import create_model  # noqa: E402
from engine.models.registry import CIFAR10  # noqa: E402
from engine.training.autotune import Candidate, make_step, thread_count, time_candidates  # noqa: E402

log = logging.getLogger("gpu_benchmarks")
BATCH = 64


class Budget:
    """Wall-clock shares of the whole run, per section."""

    def __init__(self, total_s: float) -> None:
        self.started = time.perf_counter()
        self.total_s = total_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def deadline(self, share_end: float) -> float:
        """Return the elapsed second by which a section ending at ``share_end`` of the run must stop."""
        return share_end * self.total_s


def environment(device: torch.device, tiny: bool) -> dict[str, Any]:
    info = {
        "tiny": tiny,
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
        )
    return info


def run_section(name: str, results: dict[str, Any], out: Path, body: Callable[[], Any]) -> None:
    """Run one section, store its result or its error, and write the JSON file."""
    started = time.perf_counter()
    log.info("section %s", name)
    try:
        results[name] = body()
    except Exception as exc:  # noqa: BLE001 - one failed section must not lose the others
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        log.error("section %s failed: %s", name, exc)
    results.setdefault("section_s", {})[name] = round(time.perf_counter() - started, 2)
    (out / "gpu_benchmarks.json").write_text(json.dumps(results, indent=1))


def fused_section(device: torch.device, tiny: bool, budget: Budget, end: float) -> dict[str, Any]:
    group, width = (4, 16) if tiny else (35, 16)
    timing_s = 0.1 if tiny else 1.0
    model = f"shallow_cnn_w{width}"
    out: dict[str, Any] = {"model": model, "group_size": group, "batch_size": BATCH}
    cases = {
        "one_by_one": dict(group_size=1),
        "fused_independent": dict(group_size=group, shared=False),
        "fused_shared": dict(group_size=group, shared=True),
    }
    for name, kwargs in cases.items():
        if budget.elapsed() > budget.deadline(end):
            out[name] = "skipped: time share spent"
            continue
        out[name] = measure_throughput(model, CIFAR10, BATCH, device=device, budget_s=timing_s, **kwargs)
    if isinstance(out.get("one_by_one"), float):
        for name in ("fused_independent", "fused_shared"):
            if isinstance(out.get(name), float):
                out[f"{name}_speedup"] = out[name] / out["one_by_one"]
    return out


def _time_options(
    width: int,
    candidates: list[tuple[str, Candidate]],
    device: torch.device,
    timing_s: float,
    budget: Budget,
    end: float,
) -> dict[str, Any]:
    """Warm up (compile) each (precision, candidate) of one width, then time them interleaved."""
    model = create_model(f"shallow_cnn_w{width}")
    steps, threads, first, failed = {}, {}, {}, {}
    for precision, candidate in candidates:
        label = f"{precision} {candidate.label}"
        if budget.elapsed() > budget.deadline(end):
            failed[label] = "skipped: time share spent"
            continue
        try:
            step = make_step(model, candidate, (3, 32, 32), BATCH, precision, device)
            started = time.perf_counter()
            with thread_count(candidate.threads):
                step(0)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            first[label] = time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - record the failure, time the rest
            failed[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        steps[label], threads[label] = step, candidate.threads
    seconds = time_candidates(steps, device, timing_s, threads=threads) if steps else {}
    return {
        "images_per_s": {label: BATCH / s for label, s in seconds.items()},
        "first_step_s": first,
        "failed": failed,
    }


def compile_section(device: torch.device, tiny: bool, budget: Budget, end: float) -> dict[str, Any]:
    threads = torch.get_num_threads()
    if tiny:
        widths, modes, timing_s = (16,), ("off", "default"), 0.1
    else:
        widths, modes, timing_s = (16, 128), ("off", "default", "reduce-overhead", "max-autotune"), 0.6
    out = {}
    for width in widths:
        candidates = [
            ("fp32", Candidate(channels_last, mode, threads))
            for mode in modes
            for channels_last in (False, True)
            # max-autotune benchmarks many kernels while compiling: only w16 NCHW, to stay in time.
            if not (mode == "max-autotune" and (channels_last or width != 16))
        ]
        out[f"w{width}"] = _time_options(width, candidates, device, timing_s, budget, end)
    return out


def amp_section(device: torch.device, tiny: bool, budget: Budget, end: float) -> dict[str, Any]:
    threads = torch.get_num_threads()
    if tiny:
        precisions, modes, width, timing_s = ("fp32", "bf16"), ("off",), 16, 0.1
    else:
        precisions, modes, width, timing_s = ("fp32", "bf16", "fp16"), ("off", "reduce-overhead"), 128, 0.6
    candidates = [
        (precision, Candidate(channels_last, mode, threads))
        for precision in precisions
        for mode in modes
        for channels_last in (False, True)
    ]
    return {f"w{width}": _time_options(width, candidates, device, timing_s, budget, end)}


def loader_section(device: torch.device, tiny: bool, budget: Budget, end: float) -> dict[str, Any]:
    n = 2_000 if tiny else 25_000
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    out: dict[str, Any] = {"images": n}
    for backend in ("tensor", "dali", "ffcv"):
        if budget.elapsed() > budget.deadline(end):
            out[backend] = "skipped: time share spent"
            continue
        try:
            started = time.perf_counter()
            cache_dir = str(Path(tempfile.gettempdir()) / "engine-gpu-bench-betons")
            loader = make_loader(backend, images, labels, BATCH, device, cache_dir=cache_dir)
            setup_s = time.perf_counter() - started
            epoch_generator = torch.Generator().manual_seed(0)
            fastest = float("inf")
            for _ in range(3):  # the first epoch includes FFCV's pipeline compilation
                started = time.perf_counter()
                for x, _ in loader.epoch(epoch_generator):
                    pass
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                fastest = min(fastest, time.perf_counter() - started)
            out[backend] = {"images_per_s": n / fastest, "setup_s": setup_s, "device": str(x.device)}
            loader.close()
        except Exception as exc:  # noqa: BLE001 - a missing extra is a result, not a failure
            out[backend] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", help="folder for gpu_benchmarks.json")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-clock seconds for all sections (default 420)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    tiny = not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    if tiny:
        log.info("no CUDA device: running the tiny CPU version (checks the script, measures nothing useful)")
    else:
        torch.backends.cudnn.benchmark = True
    torch.set_flush_denormal(True)
    budget = Budget(args.budget_s if not tiny else min(args.budget_s, 120.0))
    results: dict[str, Any] = {"environment": environment(device, tiny)}
    # Section time shares: cumulative fractions of the budget at which each must stop.
    run_section("fused", results, out, lambda: fused_section(device, tiny, budget, 0.15))
    run_section("compile", results, out, lambda: compile_section(device, tiny, budget, 0.6))
    run_section("amp", results, out, lambda: amp_section(device, tiny, budget, 0.85))
    run_section("loaders", results, out, lambda: loader_section(device, tiny, budget, 1.0))
    results["total_s"] = round(budget.elapsed(), 1)
    (out / "gpu_benchmarks.json").write_text(json.dumps(results, indent=1))
    log.info("wrote %s in %.0f s", out / "gpu_benchmarks.json", budget.elapsed())
    return 0


if __name__ == "__main__":
    sys.exit(main())
