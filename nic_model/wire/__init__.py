"""Frame formats: parsing through fixed layouts into validated representations,
and emission into caller-provided buffers.

All `struct` work on frames lives here. Parsers raise IntegrityError (the bytes
cannot be a valid frame of that kind) or SanityError (well-formed but
nonsensical); the RX checker maps each kind to one drop counter.
"""

from .errors import IntegrityError, SanityError, WireError

__all__ = ["IntegrityError", "SanityError", "WireError"]
