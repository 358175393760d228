"""The interleaved side-by-side protocol the published ratios come from (bench/interleave.py)."""

import importlib.util
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
WORKER = """
import sys, time
from interleave import serve
print("noise the code under test prints")
serve(lambda: time.sleep(float(sys.argv[1])))
"""


def load_interleave():
    spec = importlib.util.spec_from_file_location("interleave", os.path.join(BENCH, "interleave.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_turns_alternate_and_time_each_side():
    interleave = load_interleave()
    env = dict(os.environ, PYTHONPATH=BENCH)
    fast = interleave.Worker("fast", [sys.executable, "-c", WORKER, "0.01"], env=env)
    slow = interleave.Worker("slow", [sys.executable, "-c", WORKER, "0.2"], env=env)
    result = interleave.interleaved([fast, slow], repeats=3, warmup=1)
    assert len(result["fast"]["runs_s"]) == len(result["slow"]["runs_s"]) == 3
    assert result["slow"]["median_s"] > 0.19 and result["fast"]["median_s"] < result["slow"]["median_s"]
    assert result["fast"]["peak_rss_mb"] > 0
    assert fast.process.returncode == 0 and slow.process.returncode == 0


def test_a_worker_that_dies_is_reported():
    interleave = load_interleave()
    with pytest.raises(RuntimeError, match="broken stopped"):
        interleave.Worker("broken", [sys.executable, "-c", "import sys; sys.exit(3)"])
