"""Population count of uint64 words, usable inside jitted functions."""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


def popcount(word: int) -> int:
    """Count the set bits of a uint64 word.

    Jitted callers get LLVM's ctpop, which compiles to POPCNT, or VPOPCNTQ in
    vectorized loops, on CPUs that have it and to a bit-twiddling sequence on
    others. numba 0.68 has no popcount function of its own. This Python body runs
    only when jitting is off (NUMBA_DISABLE_JIT=1).

    NOTE: numba's cache checks only the modification time of the file that defines
    a cached function, so callers in other files keep their old compiled code after
    this function changes. Delete the kernels' __pycache__ directories after
    editing it.
    """
    return int(word).bit_count()


@intrinsic
def _ctpop(typingctx, word):
    """Emit llvm.ctpop for a uint64 word, returning int64.

    The result is int64 because adding a uint64 to an int64 counter gives float64
    in numba.
    """
    if not isinstance(word, types.Integer) or word.bitwidth != 64 or word.signed:
        return None

    def codegen(context, builder, signature, args):
        ctpop = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(ctpop, args)

    return types.int64(word), codegen


@overload(popcount, inline="always")
def _popcount_jitted(word):
    if isinstance(word, types.Integer) and word.bitwidth == 64 and not word.signed:
        return lambda word: _ctpop(word)
    return None
