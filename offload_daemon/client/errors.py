"""The CLI's error type and argparse helpers, shared by `toe` and `toe bench`."""

from __future__ import annotations

import argparse
from typing import Any


class CLIError(Exception):
    """A failure to report as one line (`toe: <message>`), exit status 1."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP during a command that cleans up after itself."""


def ranged(lo: float, hi: float, kind: type = int) -> Any:
    """argparse type: a number of `kind` (int, also as 0x..; or float) within lo..hi."""
    def conv(text: str) -> Any:
        try:
            v = int(text, 0) if kind is int else kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not lo <= v <= hi:
            show = str if kind is int else "{:g}".format
            raise argparse.ArgumentTypeError(f"{show(v)} is out of range {show(lo)}..{show(hi)}")
        return v
    return conv
