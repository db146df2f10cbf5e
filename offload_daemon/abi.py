"""The one place that imports the compiled cffi module `_toe_abi`.

Everything else in the daemon uses the names re-exported here. Importing this
module checks that the compiled struct sizes match the ABI constants, so a
stale build fails loudly instead of corrupting shared memory.
"""

from __future__ import annotations

try:
    from ._toe_abi import ffi, lib
except ImportError as e:  # pragma: no cover - only without a build
    raise ImportError(
        "offload_daemon._toe_abi is not built: install the package (pip install .)"
    ) from e

for _name, _const in (("struct toe_cmd", lib.TOE_CMD_SIZE), ("struct toe_rsp", lib.TOE_RSP_SIZE),
                      ("struct toe_sock_shm", lib.TOE_SHM_HDR_SIZE)):
    if ffi.sizeof(_name) != _const:
        raise ImportError(f"ABI mismatch: sizeof({_name}) = {ffi.sizeof(_name)}, expected {_const}")

NULL = ffi.NULL


def csum(buf, off: int, length: int, initial: int) -> int:
    """Checksum unit: RFC 1071 checksum of buf[off:off+length] seeded with `initial`."""
    return lib.toe_csum_fold(ffi.from_buffer(buf) + off, length, initial)


__all__ = ["ffi", "lib", "NULL", "csum"]
