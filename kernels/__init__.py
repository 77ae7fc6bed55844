"""numba kernels for agreement and confusion statistics of class predictions, and
a fused 2x2 max pooling with ReLU for NHWC float32 arrays.

Every statistics function takes integer class labels of any integer dtype and memory
layout, validates them, and raises ValueError naming the argument and the offending
value. Inputs that are not C-contiguous int64 are copied to that layout first. The
pooling functions are described in kernels._pooling.

The kernels are compiled on first use and cached on disk (in __pycache__ next to
their source files, or under NUMBA_CACHE_DIR when that is set), so later processes
load them without compiling.
"""

import os

import numba

from kernels._agreement import agreement, pairwise_agreement
from kernels._counts import class_counts, confusion_matrix, tlp_plp_table
from kernels._distinct import distinct_prediction_counts
from kernels._pooling import max_pool2x2_relu, max_pool2x2_relu_backward

# Pin the threading layer so that results and timings do not depend on whether
# OpenMP or TBB happens to be installed. By default numba 0.68 picks the first of
# tbb, omp and workqueue that loads, and only workqueue ships with every build.
# An explicit NUMBA_THREADING_LAYER environment variable still wins. The setting
# takes effect only if no parallel numba function has run in this process yet.
# NOTE: workqueue is not threadsafe. Calling the statistics kernels on large inputs
# from several Python threads at once aborts the process (numba 0.68), so use one
# thread or set NUMBA_THREADING_LAYER=tbb or omp. The pooling kernels are serial
# and safe to call from several threads.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

__all__ = [
    "agreement",
    "class_counts",
    "confusion_matrix",
    "distinct_prediction_counts",
    "max_pool2x2_relu",
    "max_pool2x2_relu_backward",
    "pairwise_agreement",
    "tlp_plp_table",
]
