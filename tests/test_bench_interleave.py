"""The interleaved side-by-side protocol the published ratios come from (bench/interleave.py)."""

import importlib.util
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
WORKER = """
import sys, time
from interleave import serve
print("noise the code under test prints")
serve(lambda: time.sleep(float(sys.argv[1])), (lambda: time.sleep(float(sys.argv[2]))) if len(sys.argv) > 2 else None)
"""


def load_interleave():
    spec = importlib.util.spec_from_file_location("interleave", os.path.join(BENCH, "interleave.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_turns_alternate_and_time_each_side(child_env):
    interleave = load_interleave()
    env = child_env(PYTHONPATH=BENCH)
    fast = interleave.Worker("fast", [sys.executable, "-c", WORKER, "0.01"], env=env)
    slow = interleave.Worker("slow", [sys.executable, "-c", WORKER, "0.2"], env=env)
    result = interleave.interleaved([fast, slow], repeats=3, warmup=1)
    assert len(result["fast"]["runs_s"]) == len(result["slow"]["runs_s"]) == 3
    assert result["slow"]["median_s"] > 0.19 and result["fast"]["median_s"] < result["slow"]["median_s"]
    assert result["fast"]["peak_rss_mb"] > 0
    assert result["slow"]["p10_s"] <= result["slow"]["median_s"] <= result["slow"]["p90_s"]
    assert fast.process.returncode == 0 and slow.process.returncode == 0


def test_the_wait_for_the_device_counts_in_the_run(child_env):
    """A run that returns while its work is still queued (the official OSEDiff returns a GPU tensor before its VAE
    decode has run) is timed to the end of ``sync``."""
    interleave = load_interleave()
    env = child_env(PYTHONPATH=BENCH)
    queued = interleave.Worker("queued", [sys.executable, "-c", WORKER, "0", "0.2"], env=env)
    result = interleave.interleaved([queued], repeats=2, warmup=0)
    assert min(result["queued"]["runs_s"]) > 0.19


def test_a_failing_child_shows_its_traceback(capfd, monkeypatch):
    """Benchmark cases run in child processes: one that fails leaves its own traceback on stderr, not only an exit
    status (a device run is too short to run it again to see why)."""
    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", os.environ.get("THP_MEM_ALLOC_ENABLE", ""))  # common sets a default
    from common import child_result
    with pytest.raises(subprocess.CalledProcessError):
        child_result([sys.executable, "-c", "raise ValueError('the real cause')"])
    assert "ValueError: the real cause" in capfd.readouterr().err
    assert child_result([sys.executable, "-c", "print('noise'); print('{\"s\": 1}')"]) == {"s": 1}


def test_a_worker_that_dies_is_reported():
    interleave = load_interleave()
    with pytest.raises(RuntimeError, match="broken stopped"):
        interleave.Worker("broken", [sys.executable, "-c", "import sys; sys.exit(3)"])


def test_each_workers_cuda_context_is_its_own():
    """Workers side by side share the device: each reads the device's use, in turn as they end, so a worker's
    context is its reading less its reserved memory less what the later workers held (the next one's reading)."""
    separate = load_interleave().separate_contexts
    ends = [{"peak_rss_mb": 1.0, "device_used_mb": 10000.0, "reserved_now_mb": 3000.0},  # both on the device
            {"peak_rss_mb": 2.0},  # a worker that did not use CUDA
            {"peak_rss_mb": 3.0, "device_used_mb": 6000.0, "reserved_now_mb": 5500.0}]  # the last, alone
    assert separate(ends) == [{"peak_rss_mb": 1.0, "cuda_context_mb": 1000.0}, {"peak_rss_mb": 2.0},
                              {"peak_rss_mb": 3.0, "cuda_context_mb": 500.0}]
