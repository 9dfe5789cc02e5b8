"""Timing and memory helpers shared by the benchmarks (pure measurement, no printing).

- :func:`interleaved`: runs every candidate once per round, rounds repeated, so slow drifts of a
  shared machine hit all candidates alike; reports the median wall time and the median process
  CPU time (all threads; robust to time slices lost to other processes) of each.
- :func:`tensor_memory`: in-process tensor accounting of one call: the bytes autograd keeps for
  backward (saved-tensor hooks, each storage once, the caller's input and parameters excluded)
  and the allocator's peak over the call (torch profiler memory events, summed in time order).
- :func:`peak_rss_delta`: peak resident memory growth of a fresh Python process while it runs
  two calls, over its resident memory just before them (Linux: the VmHWM peak mark is reset with
  ``/proc/self/clear_refs`` first, then read after; large tensors are mmap-backed, so RSS tracks
  live tensors; elsewhere the ``ru_maxrss`` high-water mark, which can read 0).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict


def interleaved(candidates: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, dict]:
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    wall = {name: [] for name in candidates}
    cpu = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {
        name: {
            "wall_ms": 1e3 * statistics.median(wall[name]),
            "cpu_ms": 1e3 * statistics.median(cpu[name]),
            "wall_ms_all": [round(1e3 * t, 3) for t in wall[name]],
            "repeats": repeats,
        }
        for name in candidates
    }


def ratios(results: Dict[str, dict], baseline: str) -> Dict[str, dict]:
    """Per candidate: wall and CPU time relative to ``baseline`` (medians)."""
    base = results[baseline]
    return {
        name: {
            "wall_ratio": r["wall_ms"] / base["wall_ms"],
            "cpu_ratio": r["cpu_ms"] / base["cpu_ms"] if base["cpu_ms"] > 0 else float("nan"),
        }
        for name, r in results.items()
    }


_CHILD = r"""
import json, resource, sys, torch
spec = json.loads(sys.argv[1])
torch.set_num_threads(spec["threads"])
module = torch.load(spec["module"], weights_only=False)
x = torch.randn(*spec["shape"], requires_grad=spec["train"])
def call():
    if spec["train"]:
        y = module(x)
        y.backward(torch.ones_like(y))
    else:
        with torch.no_grad():
            module(x)
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])  # KiB
try:  # reset the peak-RSS mark (Linux >= 4.0), so imports and loading do not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before, how = status("VmRSS"), "VmHWM after clear_refs=5"
except OSError:
    before, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
call(); call()
after = status("VmHWM") if how.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_delta_mib": (after - before) / 1024.0, "how": how}))
"""


def peak_rss_delta(module_path: str, shape, train: bool, threads: int) -> float:
    """MiB of peak RSS growth while a fresh process runs the saved module twice on a random
    input of ``shape`` (forward under no_grad, or forward + backward when ``train``)."""
    spec = {"module": module_path, "shape": list(shape), "train": bool(train), "threads": threads}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(spec)],
        capture_output=True, text=True, check=True, cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])},
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_delta_mib"])


def tensor_memory(fn: Callable[[], object], exclude=()) -> dict:
    """MiB kept for backward by the autograd graph ``fn`` builds (``fn`` runs forward and backward;
    tensors sharing storage with ``exclude`` -- the input, the parameters -- do not count) and
    MiB of the allocator's peak while ``fn`` runs (None where the profiler gives no events)."""
    import torch

    own = {t.untyped_storage().data_ptr() for t in exclude}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    fn()  # warm-up: lazily built tables and caches do not count
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    _, peak = allocator_peak(fn)
    return {"saved_for_backward_mib": sum(saved.values()) / 2**20, "allocator_peak_mib": peak}


def allocator_peak(fn: Callable[[], object]):
    """(``fn()``, MiB of the torch allocator's peak while it runs): the profiler's memory events
    summed in time order; None where the profiler gives no events."""
    try:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.__enter__()
    except Exception:  # noqa: BLE001 - no profiler here: the call alone
        return fn(), None
    try:
        result = fn()
    finally:
        prof.__exit__(None, None, None)
    try:
        events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns())
    except Exception:  # noqa: BLE001 - a private profiler API; report what is available
        return result, None
    current = top = 0
    for event in events:
        current += event.nbytes()
        top = max(top, current)
    return result, (top / 2**20 if events else None)


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": load,
    }
