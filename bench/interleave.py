"""Side-by-side timing of two implementations, interleaved run by run.

On a shared machine the speed drifts by ±20 % over minutes, so timing one implementation after the
other compares two different machines. Here both stay loaded in their own process and take turns
(A B B A A B …): each run of one is next to a run of the other, and the ratio of medians is fair.

Worker side (a benchmark script with ``--serve``): ``serve(run_once)`` prints ``BENCH ready``, waits for
a ``run`` line on stdin, runs once and prints ``BENCH {"s": seconds}``; ``end`` prints the peak RSS and
returns. Driver side: ``Worker(cmd)`` starts a worker and waits until it has loaded; ``interleaved``
takes the turns. Only lines starting with ``BENCH`` are read: the code under test may print anything.
"""

import json
import resource
import statistics
import subprocess
import sys
import time

PREFIX = "BENCH "


def _say(message):
    sys.stdout.write(PREFIX + message + "\n")
    sys.stdout.flush()


def serve(run_once):
    """Run ``run_once()`` each time the driver asks; report seconds per run, then the peak RSS (MiB)."""
    while True:
        _say("ready")
        if sys.stdin.readline().strip() != "run":
            break
        start = time.perf_counter()
        run_once()
        _say(json.dumps({"s": time.perf_counter() - start}))
    _say(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


class Worker:
    """A ``serve`` process: started, then waited for until it has loaded its model."""

    def __init__(self, name, cmd, env=None):
        self.name = name
        self.process = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._expect("ready")

    def _read(self):
        for line in self.process.stdout:
            if line.startswith(PREFIX):
                return line[len(PREFIX):].strip()
        raise RuntimeError(f"{self.name} stopped (exit status {self.process.wait()}); see its stderr above")

    def _expect(self, word):
        got = self._read()
        if got != word:
            raise RuntimeError(f"{self.name}: expected {word!r}, got {got!r}")

    def run(self):
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        seconds = json.loads(self._read())["s"]
        self._expect("ready")
        return seconds

    def close(self):
        """End the worker; its peak RSS in MiB."""
        self.process.stdin.write("end\n")
        self.process.stdin.flush()
        peak = json.loads(self._read())["peak_rss_mb"]
        self.process.wait()
        return peak


def interleaved(workers, repeats, warmup=1):
    """Warm every worker up, then ``repeats`` turns in A B B A order; per worker: runs, median, peak RSS."""
    for worker in workers:
        for _ in range(warmup):
            worker.run()
    times = {w.name: [] for w in workers}
    for turn in range(repeats):
        for worker in (workers if turn % 2 == 0 else workers[::-1]):
            times[worker.name].append(worker.run())
    return {w.name: {"runs_s": times[w.name], "median_s": statistics.median(times[w.name]),
                     "min_s": min(times[w.name]), "peak_rss_mb": w.close()} for w in workers}
