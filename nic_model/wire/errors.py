"""Typed parse errors; each carries a short reason used as a drop counter key."""


class WireError(Exception):
    """A frame that must be dropped. `reason` names the drop counter."""

    reason = "malformed"

    def __init__(self, detail: str, reason: str | None = None):
        super().__init__(detail)
        if reason is not None:
            self.reason = reason


class IntegrityError(WireError):
    """The bytes cannot be a frame of this kind (length, version, checksum)."""

    reason = "integrity"


class SanityError(WireError):
    """Well-formed but forbidden by the protocol (e.g. SYN+FIN, multicast source)."""

    reason = "sanity"
