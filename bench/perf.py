"""The `toe_perf` benchmark program (bench/toe_perf.c): where it is, what it prints.

`toe_perf` is built by setup.py (`scripts/setup.sh`) as the executable
`bench/toe_perf`; its client prints one JSON object on one line, described in
the header comment of bench/toe_perf.c.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from typing import Any

REQUIRED_KEYS = frozenset(
    {
        "test",
        "size",
        "rsize",
        "duration_s",
        "elapsed_s",
        "bytes",
        "transactions",
        "short_calls",
        "lat_ns",
        "cpu_user_s",
        "cpu_sys_s",
    }
)


def perf_path() -> str:
    """Absolute path of the built `toe_perf` executable; FileNotFoundError if it is not built."""
    path = os.path.abspath(str(importlib.resources.files("bench") / "toe_perf"))
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise FileNotFoundError(f"{path} is not built: run `bash scripts/setup.sh`")
    return path


def parse_client_output(text: str) -> dict[str, Any]:
    """The result of a `toe_perf client` run: the last line of `text` that starts with "{".

    Raises ValueError (one line) if there is no such line, it is not a JSON
    object, or it lacks one of REQUIRED_KEYS.
    """
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise ValueError("toe_perf printed no result (no line starting with '{')")
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise ValueError(f"toe_perf result is not valid JSON: {e}") from None
    if not isinstance(result, dict):
        raise ValueError("toe_perf result is not a JSON object")
    missing = sorted(REQUIRED_KEYS - result.keys())
    if missing:
        raise ValueError(f"toe_perf result lacks {', '.join(missing)}")
    return result
