"""Fixtures for the shim tests: the compiled shim, the cffi module, the fake adapter.

The shim is built here from the current sources with exactly the project's
flags into build/shim/libtoe_shim.so.  The daemon's cffi module is the one an
editable install built in place, or else a build of offload_daemon/_abi_build.py
into build/cffi (added to the offload_daemon package's path).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIM_DIR = ROOT / "shim"
BUILD = ROOT / "build"
SHIM_SO = BUILD / "shim" / "libtoe_shim.so"
CFFI_DIR = BUILD / "cffi"
HERE = Path(__file__).resolve().parent

SHIM_CFLAGS = ["-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden",
               "-pthread", "-D_GNU_SOURCE"]
SHIM_LDFLAGS = ["-shared", "-ldl", "-lpthread"]


def _build_shim() -> Path:
    SHIM_SO.parent.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p) for p in SHIM_DIR.glob("*.c"))
    r = subprocess.run(["gcc", *SHIM_CFLAGS, "-o", str(SHIM_SO), *sources, *SHIM_LDFLAGS],
                       capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), f"shim build:\n{r.stderr}"
    return SHIM_SO


def _ensure_cffi() -> None:
    """Make offload_daemon._toe_abi importable: the in-place build of an editable
    install (scripts/setup.sh), else a build of _abi_build.py into build/cffi."""
    import offload_daemon

    if importlib.util.find_spec("offload_daemon._toe_abi") is not None:
        return
    if not glob.glob(str(CFFI_DIR / "offload_daemon" / "_toe_abi*.so")):
        subprocess.run([sys.executable, str(ROOT / "offload_daemon" / "_abi_build.py")],
                       check=True, cwd=ROOT)
    offload_daemon.__path__.append(str(CFFI_DIR / "offload_daemon"))


_ensure_cffi()


@pytest.fixture(scope="session")
def shim_so() -> Path:
    return _build_shim()


@pytest.fixture(scope="session")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe") / "probe"
    subprocess.run(["gcc", "-O2", "-D_FORTIFY_SOURCE=2", "-Wall", "-Wextra", "-Werror", "-pthread",
                    "-o", str(out), str(HERE / "probe.c")], check=True)
    return out


@pytest.fixture
def ctl_dir():
    d = tempfile.mkdtemp(prefix="toe-shim-")  # short: sun_path holds 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake(ctl_dir):
    from .fake_adapter import FakeAdapter

    with FakeAdapter(os.path.join(ctl_dir, "toe0.sock")) as f:
        yield f
    assert not f.errors, f.errors


@pytest.fixture
def env(shim_so, fake):
    """Environment that runs a program under the shim against the fake."""
    e = dict(os.environ)
    e.update(LD_PRELOAD=str(shim_so), TOE_SOCK=fake.path)
    e.pop("TOE_DEBUG", None)
    return e
