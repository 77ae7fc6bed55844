"""Fused training: many small networks of one architecture trained in one step.

The shallow CNN and MLP families have fused versions (``FusedShallowCNN``,
``FusedMLP``) whose parameters stack G members along dim 0. ``choose_group_size``
measures the group size, and ``train_group`` trains each group; every member remains
an independent run. ``engine.experiments.dispatch.run_jobs`` decides per bucket of
jobs whether they train fused.
"""

from engine.fused.modules import FusedMLP, FusedModule, FusedShallowCNN, empty_fused_like, fuse_members, is_fusable
from engine.fused.sgd import FusedSGD, fused_train_step
from engine.fused.strategy import GroupChoice, choose_group_size, clear_cache, measure_throughput
from engine.fused.trainer import FusedOptions, train_group

__all__ = [
    "FusedMLP",
    "FusedModule",
    "FusedOptions",
    "FusedSGD",
    "FusedShallowCNN",
    "GroupChoice",
    "choose_group_size",
    "clear_cache",
    "empty_fused_like",
    "fuse_members",
    "fused_train_step",
    "is_fusable",
    "measure_throughput",
    "train_group",
]
