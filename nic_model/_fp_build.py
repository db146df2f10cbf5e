"""cffi build script for `nic_model._fastpath`: seed 003's hardware units, compiled.

The cdef is nic_model/hw/fp.h itself, reduced to what cffi's parser takes
(the same reduction as offload_daemon/_abi_build.py does for the shim's ABI
header); the sources are the units, one file each (fp.h says which is which).
`make_ffi` builds variants: the tests compile the units again with
AddressSanitizer and UBSan under another module name.
"""

from __future__ import annotations

import glob
import importlib.util
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
FP_DIR = os.path.join(HERE, "hw")
SHIM = os.path.join(os.path.dirname(HERE), "shim")
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-D_GNU_SOURCE", "-std=gnu11"]


def _reducer():
    """offload_daemon/_abi_build.py's header reduction, loaded by path (a build script runs
    before the packages are importable)."""
    spec = importlib.util.spec_from_file_location(
        "_toe_abi_build", os.path.join(os.path.dirname(HERE), "offload_daemon", "_abi_build.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.reduce_to_cdef


def fp_cdef() -> str:
    return _reducer()(os.path.join(FP_DIR, "fp.h"), "FP_CDEF")


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(FP_DIR, "*.c")))


def make_ffi(module: str = "nic_model._fastpath", cflags: list[str] | None = None,
             ldflags: list[str] | None = None, relative: bool = True) -> FFI:
    ffi = FFI()
    ffi.cdef(fp_cdef())
    srcs = sources()
    if relative:       # setup.py builds from the project root: keep paths relative there
        root = os.path.dirname(HERE)
        srcs = [os.path.relpath(p, root) for p in srcs]
    ffi.set_source(module, '#include "fp.h"', sources=srcs, include_dirs=[FP_DIR, SHIM],
                   extra_compile_args=CFLAGS + (cflags or []), extra_link_args=ldflags or [],
                   libraries=["m"], depends=glob.glob(os.path.join(FP_DIR, "*.h")))
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.join(HERE, "..", "build", "cffi"), verbose=False)
