"""Argument types shared by the command lines: their errors name the value and the fix."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """Parse a whole number >= 1 for argparse, or raise ``ArgumentTypeError`` saying what to give."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive; give a whole number >= 1")
    return value
