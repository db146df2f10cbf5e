"""Build of toe: the Python packages, the daemon's cffi module and the shim.

The shim (`shim/libtoe_shim.so`) is a plain shared object, not a Python
extension: it is preloaded into arbitrary binaries and must not reference
libpython. It is built by setuptools' build_ext (the toolchain cffi uses too)
through `ShimBuildExt`, which names the output exactly `shim/libtoe_shim.so`
and links nothing but the libraries listed here.

The benchmark program (`bench/toe_perf`, from PERF_SOURCES: bench/toe_perf.c
and its parts bench/toe_perf_*.c, sharing bench/toe_perf.h) is an executable,
not a library: `ShimBuildExt` compiles and links it as one, under that exact
name (no suffix), executable bit kept in both editable installs and wheels.
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
PERF_EXT = "bench.toe_perf"
PERF_SOURCES = [
    "bench/toe_perf.c",  # main, arguments, common helpers, the wire header (and the program's description)
    "bench/toe_perf_client.c",
    "bench/toe_perf_server.c",
    "bench/toe_perf_stats.c",
    "bench/toe_perf_net.c",
]
PERF_CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror", "-D_GNU_SOURCE", "-pthread"]


def _is_shim(name: str) -> bool:
    return name == SHIM_EXT or name == SHIM_EXT.rsplit(".", 1)[1]


def _is_perf(name: str) -> bool:
    return name == PERF_EXT or name == PERF_EXT.rsplit(".", 1)[1]


class ShimBuildExt(build_ext):
    """build_ext that builds the shim as a plain `.so` (no ABI tag, no libpython)
    and `bench/toe_perf` as an executable."""

    def get_ext_filename(self, fullname: str) -> str:
        if _is_shim(fullname):
            return os.path.join(*fullname.split(".")) + ".so"
        if _is_perf(fullname):
            return os.path.join(*fullname.split("."))
        return super().get_ext_filename(fullname)

    def build_extension(self, ext: Extension) -> None:
        if not _is_perf(ext.name):
            super().build_extension(ext)
            return
        path = self.get_ext_fullpath(ext.name)
        objects = self.compiler.compile(
            ext.sources, output_dir=self.build_temp, extra_postargs=ext.extra_compile_args, depends=ext.depends
        )
        self.compiler.link_executable(
            objects, os.path.basename(path), output_dir=os.path.dirname(path), extra_postargs=ext.extra_link_args
        )
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise SystemExit(f"toe: linking {ext.sources[0]} did not produce the executable {path}")

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


def perf_extension() -> Extension:
    """The benchmark program; an Extension only so that build_ext builds it (see ShimBuildExt)."""
    return Extension(
        PERF_EXT,
        sources=PERF_SOURCES,
        depends=["bench/toe_perf.h"],
        extra_compile_args=PERF_CFLAGS,
        extra_link_args=["-pthread"],
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
    ext_modules=[shim_extension(), perf_extension()],
    cffi_modules=["offload_daemon/_abi_build.py:ffibuilder", "nic_model/_fp_build.py:ffibuilder"],
    cmdclass={"build_ext": ShimBuildExt},
    install_requires=["cffi>=1.15", "pyroute2", "psutil", "rich"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "scapy", "hypothesis", "ruff", "mypy"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["toe = offload_daemon.cli:main"]},
    zip_safe=False,
)
