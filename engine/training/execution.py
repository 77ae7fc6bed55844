"""Execution options of a training: loader, layout, compilation, threads, autotuning.

None of these options changes the protocol, so none enters a job's key. They change
rounding (a channels_last or compiled convolution sums in another order), so runs
with different options agree within seed noise, not bitwise. The arithmetic
precision is different: ``--amp`` sets ``TrainConfig.precision``, which is part of
the protocol and of every job key, and autotuning never changes it.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from engine.arguments import positive_int
from engine.errors import UsageError

LOADERS = ("tensor", "ffcv", "dali")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
AMP_MODES = ("off", "bf16", "fp16")
# ``--amp`` value -> ``TrainConfig.precision``.
AMP_PRECISION = {"off": "fp32", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class ExecutionOptions:
    """Execution options of the trainers; the defaults train as a plain eager loop does.

    Attributes:
        loader: where minibatches come from: ``tensor`` (the split held on the
            device as uint8), ``ffcv`` (a .beton file per split) or ``dali`` (a DALI
            pipeline fed from the same arrays). All yield the same batches.
        channels_last: convolutions in NHWC layout; None lets autotuning decide
            (plain NCHW when autotuning is off).
        compile: ``torch.compile`` mode of the model, ``off`` for eager; None lets
            autotuning decide (eager when autotuning is off).
        threads: CPU threads of a training (``torch.set_num_threads`` while it
            runs); None lets autotuning decide on a CPU (the process's setting when
            autotuning is off or on a GPU).
        lanes: networks trained at the same time in this process, each in its own
            thread with ``threads`` CPU threads (CPU only); None lets autotuning decide
            (1 when autotuning is off). See ``engine.training.lanes``.
        amp: autocast dtype; recorded here, but it takes effect through
            ``TrainConfig.precision`` (see ``precision``).
        autotune: measure the options left at None on the device and keep the
            fastest; False keeps exactly the options given.
        cache_dir: folder of the loaders' files (FFCV .beton files); None uses a
            per-user cache folder.
    """

    loader: str = "tensor"
    channels_last: bool | None = None
    compile: str | None = None
    threads: int | None = None
    lanes: int | None = None
    amp: str = "off"
    autotune: bool = True
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.loader not in LOADERS:
            raise UsageError(f"unknown loader {self.loader!r}; choose from {', '.join(LOADERS)}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise UsageError(f"unknown compile mode {self.compile!r}; choose from {', '.join(COMPILE_MODES)}")
        if self.amp not in AMP_MODES:
            raise UsageError(f"unknown amp mode {self.amp!r}; choose from {', '.join(AMP_MODES)}")
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise UsageError(f"threads={self.threads!r} must be a positive integer, or None to tune")
        if self.lanes is not None and (isinstance(self.lanes, bool) or self.lanes < 1):
            raise UsageError(f"lanes={self.lanes!r} must be a positive integer, or None to tune")

    @property
    def precision(self) -> str:
        """The ``TrainConfig.precision`` that ``amp`` stands for: fp32, bf16 or fp16."""
        return AMP_PRECISION[self.amp]

    @property
    def resolved(self) -> bool:
        """Whether every option of one network's training has a value (the lanes are decided per run)."""
        return self.channels_last is not None and self.compile is not None and self.threads is not None

    def with_defaults(self) -> "ExecutionOptions":
        """Return these options with every undecided one set to the plain choice.

        Threads default to the current count, shared among the lanes when there are several.
        """
        return dataclasses.replace(
            self,
            channels_last=bool(self.channels_last),
            compile=self.compile or "off",
            threads=self.default_threads(),
            lanes=self.lanes or 1,
        )

    def default_threads(self) -> int:
        """Return ``threads``, or when it is unset the process's count shared among the lanes."""
        return self.threads or max(1, torch.get_num_threads() // (self.lanes or 1))

    def check_device(self, device: torch.device | str, precision: str | None = None) -> None:
        """Raise ``UsageError`` for options the device cannot run.

        fp16 autocast (from ``amp`` or the protocol's ``precision``) needs a CUDA GPU:
        on the CPU it has no fast kernels and no gradient scaling in this engine, so
        bf16 is the CPU's reduced precision. ``reduce-overhead`` records CUDA graphs,
        which only a CUDA device has.
        """
        device = torch.device(device)
        if "fp16" in (self.precision, precision) and device.type != "cuda":
            raise UsageError(f"--amp fp16 needs a CUDA GPU, not {device}; on the CPU use --amp bf16 or off")
        if self.compile == "reduce-overhead" and device.type != "cuda":
            raise UsageError(
                f"--compile reduce-overhead records CUDA graphs and needs a CUDA GPU, not {device}; "
                "use --compile default"
            )
        if self.lanes is not None and self.lanes > 1 and device.type != "cpu":
            raise UsageError(
                f"--lanes {self.lanes} trains networks in CPU threads, not on {device}; "
                "on a GPU leave --lanes unset and let fused groups train networks together"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ExecutionOptions":
        """Build the options from the arguments that ``add_execution_arguments`` defined."""
        return cls(
            loader=args.loader,
            channels_last=args.channels_last,
            compile=args.compile,
            threads=args.threads,
            lanes=args.lanes,
            amp=args.amp,
            autotune=not args.no_autotune,
            cache_dir=args.loader_cache,
        )


def add_execution_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the execution options to ``parser`` as one argument group and return the group."""
    group = parser.add_argument_group(
        "speed (these options change rounding, not the protocol; --amp changes the protocol)"
    )
    group.add_argument(
        "--loader", choices=LOADERS, default="tensor",
        help="minibatch source: the split held on the device (tensor, default), FFCV .beton files, or DALI",
    )
    group.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None,
        help="convolutions in NHWC layout (default: measured by autotuning, else off)",
    )
    group.add_argument(
        "--compile", choices=COMPILE_MODES, default=None,
        help="torch.compile mode of the model (default: measured by autotuning, else off)",
    )
    group.add_argument(
        "--threads", type=positive_int, default=None,
        help="CPU threads per training (default: measured by autotuning between 1 and the "
        "process's count, else the process's count)",
    )
    group.add_argument(
        "--lanes", type=positive_int, default=None,
        help="networks trained at the same time on the CPU, each in its own thread with --threads "
        "threads (default: the process's thread count divided by the lanes). Default lanes: measured by "
        "autotuning, 1 or the process's thread count, else 1",
    )
    group.add_argument(
        "--amp", choices=AMP_MODES, default="off",
        help="autocast dtype of forward and backward passes; sets the protocol's precision "
        "and so the job keys (default: off, fp32). fp16 needs a CUDA GPU",
    )
    group.add_argument(
        "--no-autotune", action="store_true",
        help="keep the options given (unset ones off) instead of timing a few steps of each "
        "combination of layout, compilation, threads and lanes per architecture on this device",
    )
    group.add_argument(
        "--loader-cache",
        help="folder for the loaders' files, such as FFCV .beton files (default: a per-user cache folder)",
    )
    return group
