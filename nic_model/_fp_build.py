"""cffi build script for `nic_model._fastpath`: seed 003's hardware units, compiled.

The cdef is nic_model/hw/fp.h itself, reduced to what cffi's parser takes
(the same reduction as offload_daemon/_abi_build.py does for the shim's ABI
header); the sources are the units, one file each (fp.h says which is which).
`make_ffi` builds variants: the tests compile the units again with
AddressSanitizer and UBSan under another module name.
"""

from __future__ import annotations

import glob
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
FP_DIR = os.path.join(HERE, "hw")
SHIM = os.path.join(os.path.dirname(HERE), "shim")
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-D_GNU_SOURCE", "-std=gnu11"]


def fp_cdef() -> str:
    with open(os.path.join(FP_DIR, "fp.h")) as f:
        text = f.read()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    out, skip = [], 0
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#ifndef FP_CDEF"):
            skip = 1
            continue
        if skip:
            if s.startswith("#endif"):
                skip = 0
            continue
        if s.startswith("#"):
            if re.match(r"#define\s+\w+\s+-?\d+\s*$", s):
                out.append(s)
            continue
        out.append(line)
    return "\n".join(out)


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
