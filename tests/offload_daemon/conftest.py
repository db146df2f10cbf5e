"""Every harness a test made is closed after it: its descriptors and mappings (a suite of
thousands of connections would otherwise keep them all)."""

from __future__ import annotations

import pytest

from tests.offload_daemon.fixtures import Harness


@pytest.fixture(autouse=True)
def _close_harnesses():
    yield
    Harness.close_all()
