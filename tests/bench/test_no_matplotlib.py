"""`toe bench` without matplotlib (a plain `pip install .`): results written, one line on how to
get the plots, never a ModuleNotFoundError."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import report
from bench.errors import BenchError
from tests.conftest import unique

BLOCK = ("import sys; sys.modules['matplotlib'] = None; sys.modules['matplotlib.figure'] = None; "
         "from offload_daemon.cli import main; sys.argv[0] = 'toe'; sys.exit(main(sys.argv[1:]))")


def test_plotting_unavailable_is_a_bench_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert not report.plotting_available()
    with pytest.raises(BenchError) as e:
        report.plot_vs_size([], scenario="rr", metric="tps", path=tmp_path / "x.png", title="t", ylabel="y")
    assert str(e.value) == report.PLOTS_HINT and "pip install 'toe[bench]'" in str(e.value)


def test_plotting_available_with_matplotlib():
    pytest.importorskip("matplotlib")
    assert report.plotting_available()


@pytest.mark.integration
@pytest.mark.parametrize("args", [["rr", "--size", "1"], ["seeds", "--only", "001", "--sizes", "256"]])
def test_bench_without_matplotlib_writes_results_and_says_how(tmp_path, args):
    out = tmp_path / unique("out")
    res = subprocess.run([sys.executable, "-c", BLOCK, "bench", *args, "--duration", "0.2", "--repeat", "1",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    assert "ModuleNotFoundError" not in res.stdout + res.stderr and "Traceback" not in res.stderr
    assert [ln for ln in res.stdout.splitlines() if ln.strip() == report.PLOTS_HINT], res.stdout
    doc = json.loads((out / "results.json").read_text())
    assert doc["plots"] == [] and doc["samples"]
    assert not list(out.glob("*.png"))
