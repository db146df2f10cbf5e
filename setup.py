"""Build of toe: the Python packages, the daemon's cffi module and the shim.

The shim (`shim/libtoe_shim.so`) is a plain shared object, not a Python
extension: it is preloaded into arbitrary binaries and must not reference
libpython. It is built by setuptools' build_ext (the toolchain cffi uses too)
through `ShimBuildExt`, which names the output exactly `shim/libtoe_shim.so`
and links nothing but the libraries listed here.
"""

from __future__ import annotations

import glob
import os

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM_EXT = "shim.libtoe_shim"
SHIM_CFLAGS = [
    "-O2",
    "-fPIC",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-fvisibility=hidden",
    "-pthread",
    "-D_GNU_SOURCE",
]


def _is_shim(name: str) -> bool:
    return name == SHIM_EXT or name == SHIM_EXT.rsplit(".", 1)[1]


class ShimBuildExt(build_ext):
    """build_ext that builds the shim as a plain `.so` (no ABI tag, no libpython)."""

    def get_ext_filename(self, fullname: str) -> str:
        if _is_shim(fullname):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext: Extension) -> list[str]:
        if _is_shim(ext.name):
            return []  # no PyInit_*: the shim exports only what it marks visible
        return super().get_export_symbols(ext)

    def get_libraries(self, ext: Extension) -> list[str]:
        if _is_shim(ext.name):
            return list(ext.libraries)  # never libpython
        return super().get_libraries(ext)


def shim_extension() -> Extension:
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "shim", "*.c")))
    if not sources:
        raise SystemExit("toe: no shim sources (shim/*.c): cannot build shim/libtoe_shim.so")
    return Extension(
        SHIM_EXT,
        sources=sources,
        include_dirs=["shim"],
        depends=sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "shim", "*.h"))),
        extra_compile_args=SHIM_CFLAGS,
        extra_link_args=["-pthread"],
        libraries=["dl", "pthread"],
    )


ROOTS = ["shim", "offload_daemon", "nic_model", "bench", "tests"]

setup(
    name="toe",
    version="0.1.0",
    description="User-space TCP Offload Engine emulator: LD_PRELOAD shim, offload daemon, TAP",
    python_requires=">=3.11",
    packages=find_packages(include=[p for r in ROOTS for p in (r, r + ".*")]),
    package_data={"shim": ["*.h"]},
    include_package_data=False,
    ext_modules=[shim_extension()],
    cffi_modules=["offload_daemon/_abi_build.py:ffibuilder"],
    cmdclass={"build_ext": ShimBuildExt},
    install_requires=["cffi>=1.15", "pyroute2", "psutil", "rich"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "scapy", "hypothesis", "ruff", "mypy"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["toe = offload_daemon.cli:main"]},
    zip_safe=False,
)
