"""Side-by-side timing of two implementations, interleaved run by run.

On a shared machine the speed drifts by ±20 % over minutes, so timing one implementation after the
other compares two different machines. Here both stay loaded in their own process and take turns
(A B B A A B …): each run of one is next to a run of the other, and the ratio of medians is fair.

Worker side (a benchmark script with ``--serve``): ``serve(run_once, sync)`` prints ``BENCH ready``, waits
for a ``run`` line on stdin, runs once (and waits for the device with ``sync``, so work still queued on a GPU
counts in its own run) and prints ``BENCH {"s": seconds}``; ``end`` prints the peak RSS and, where CUDA was
used, the peak GPU memory and the device's memory in use now, and returns. Driver side: ``Worker(cmd)`` starts a worker and waits until it
has loaded; ``interleaved`` takes the turns. Only lines starting with ``BENCH`` are read: the code under test
may print anything.
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


def serve(run_once, sync=None):
    """Run ``run_once()`` (then ``sync()``) each time the driver asks; report seconds per run, then the peaks (MiB):
    RSS, and the CUDA allocator's allocated and reserved where this process used CUDA."""
    while True:
        _say("ready")
        if sys.stdin.readline().strip() != "run":
            break
        start = time.perf_counter()
        run_once()
        if sync is not None:
            sync()
        _say(json.dumps({"s": time.perf_counter() - start}))
    _say(json.dumps({"peak_rss_mb": peak_rss_mb(), **cuda_peaks(), **device_in_use()}))


def peak_rss_mb():
    """This process's peak resident set size (MiB): VmHWM, the peak of its own memory since it started. A child's
    ``ru_maxrss`` starts at its parent's RSS at the fork (Linux keeps it across exec), so every worker of a driver
    holding the random weights (bench_osediff --compare-official: about 7 GB) reported the driver's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # no /proc
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cuda_peaks():
    """Where this process used CUDA (MiB): the allocator's peak allocated and reserved since the last reset, and what
    else the process holds on the device (CUDA context, cuBLAS/cuDNN workspaces), so that peak reserved + context is
    the process's peak device memory. The context is read as the device's use beyond this process's allocator, so
    it is this process's where it is alone on the device; for workers side by side, ``interleaved`` replaces it
    with each one's own (``separate_contexts``)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"peak_cuda_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
            "peak_cuda_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
            "cuda_context_mb": outside_allocator_bytes() / 2**20}


def device_used_bytes():
    """The device's memory in use, by every process on it: total − free."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free


def outside_allocator_bytes():
    """What the device holds beyond PyTorch's allocator (CUDA context, cuBLAS/cuDNN workspaces): used − reserved,
    where this process is alone on the device."""
    import torch

    return device_used_bytes() - torch.cuda.memory_reserved()


def device_in_use():
    """Where this process used CUDA (MiB): the device's memory in use (every process's) and this process's reserved,
    now; ``separate_contexts`` turns them into each worker's own context."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"device_used_mb": device_used_bytes() / 2**20, "reserved_now_mb": torch.cuda.memory_reserved() / 2**20}


def separate_contexts(ends):
    """Each worker's ``cuda_context_mb`` from the ``end`` reports of workers that ended in turn, each after the one
    before had exited, so the later ones still held the device: what the device held beyond this worker's reserved
    memory, less what the next one found in use (the later workers'). The last one's is all the rest of the
    device's use. Both readings leave the reports."""
    used = [end.pop("device_used_mb", None) for end in ends]
    for i, end in enumerate(ends):
        if used[i] is not None:
            later = next((u for u in used[i + 1:] if u is not None), 0.0)
            end["cuda_context_mb"] = used[i] - end.pop("reserved_now_mb") - later
    return ends


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
        """End the worker; its peaks in MiB (``peak_rss_mb``, and the CUDA ones where it used CUDA)."""
        self.process.stdin.write("end\n")
        self.process.stdin.flush()
        peaks = json.loads(self._read())
        self.process.wait()
        return peaks


def interleaved(workers, repeats, warmup=1):
    """Warm every worker up, then ``repeats`` turns in A B B A order; per worker: runs, median, p10, p90, min and
    its peaks."""
    for worker in workers:
        for _ in range(warmup):
            worker.run()
    times = {w.name: [] for w in workers}
    for turn in range(repeats):
        for worker in (workers if turn % 2 == 0 else workers[::-1]):
            times[worker.name].append(worker.run())
    ends = separate_contexts([w.close() for w in workers])  # in turn: each after the one before has exited
    return {w.name: {"runs_s": times[w.name], **percentiles(times[w.name]), **end} for w, end in zip(workers, ends)}


def percentiles(times):
    """Median, p10, p90 (nearest rank), min of run times in seconds, and their count."""
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]
    return {"median_s": statistics.median(times), "p10_s": pick(0.1), "p90_s": pick(0.9), "min_s": ordered[0],
            "runs": len(times)}
