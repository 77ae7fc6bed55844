"""Shared fixtures of the benchmarks and the speedup summary printed after them."""

import pytest

# Median seconds per call, keyed by benchmark case and then by implementation.
_MEDIANS: dict[str, dict[str, float]] = {}
# Seconds of the first call of each public kernel in a fresh process, keyed by
# cache state ("empty cache", "warm cache") and then by function name.
_FIRST_CALLS: dict[str, dict[str, float]] = {}


@pytest.fixture
def medians() -> dict[str, dict[str, float]]:
    """Return the store of median times that the terminal summary reads."""
    return _MEDIANS


@pytest.fixture
def first_calls() -> dict[str, dict[str, float]]:
    """Return the store of first-call times that the terminal summary reads."""
    return _FIRST_CALLS


def pytest_terminal_summary(terminalreporter) -> None:
    """Print the numba speedup over NumPy per case and the first-call times."""
    if _MEDIANS:
        terminalreporter.section("numba kernels against NumPy references (median per call)")
        for case, times in _MEDIANS.items():
            if "numba" not in times or "numpy" not in times:
                continue
            terminalreporter.write_line(
                f"{case:<44} numba {times['numba'] * 1e3:9.3f} ms   "
                f"numpy {times['numpy'] * 1e3:9.3f} ms   "
                f"speedup {times['numpy'] / times['numba']:8.1f}x"
            )
    if _FIRST_CALLS:
        terminalreporter.section("first call in a fresh process (seconds)")
        for state, calls in _FIRST_CALLS.items():
            listed = ", ".join(f"{name} {seconds:.2f}" for name, seconds in calls.items())
            terminalreporter.write_line(f"{state}: {listed}")
