"""The benchmark's one error type: something the user can fix or must know, in one line."""

from __future__ import annotations

from offload_daemon.client.errors import CLIError


class BenchError(CLIError):
    """A benchmark cannot run, or a measurement failed; str() is one readable line.

    A CLIError, so `toe` prints it as `toe: <line>` and exits 1."""

    def __str__(self) -> str:
        return " ".join(super().__str__().split())
