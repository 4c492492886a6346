"""Benchmark helpers: CUDA-event timing of CUDA-graph replays, ceilings measured in the same run,
tables, JSON. Decimal units (1 GB/s = 1e9 B/s)."""
from __future__ import annotations

import datetime
import json
import os
import statistics

import cupy

from fi_cupy._core.streams import as_cupy


def torch_or_none():
    try:
        import torch
        return torch if torch.cuda.is_available() else None
    except ImportError:
        return None


def time_graph(fn, calls_per_graph: int = 20, replays: int = 30, warmup: int = 3) -> float:
    """Median seconds per fn() call: fn() is captured calls_per_graph times into one CUDA graph (so
    host overhead is out of the measurement), each replay timed with CUDA events."""
    torch = torch_or_none()
    for _ in range(warmup):
        fn()  # compile, load, allocate outside the capture
    if torch is not None:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls_per_graph):
                fn()
        launch, stream_ptr = g.replay, torch.cuda.current_stream().cuda_stream
    else:
        # The capture stream is non-blocking: it does not wait for what the legacy stream still holds (the
        # inputs, a plan's metadata upload, the warm-ups), so wait for the device before its graph runs.
        cupy.cuda.Device().synchronize()
        s = cupy.cuda.Stream(non_blocking=True)
        with s:
            fn()  # once on the capture stream (state a call keeps per stream is made outside the capture)
            s.begin_capture()
            for _ in range(calls_per_graph):
                fn()
            g = s.end_capture()
        launch, stream_ptr = (lambda: g.launch(s)), s.ptr
    stream = as_cupy(stream_ptr)
    times = []
    for i in range(replays + warmup):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record(stream)
        launch()
        b.record(stream)
        b.synchronize()
        if i >= warmup:
            times.append(cupy.cuda.get_elapsed_time(a, b) / 1e3 / calls_per_graph)
    return statistics.median(times)


def per_call_us(fn, n: int = 500, warmup: int = 10, sync=None) -> float:
    """Wall time of one fn() call issued back to back, host overhead included, microseconds. sync
    (e.g. torch.cuda.synchronize) runs before and after the timed loop, so queued GPU work counts."""
    import time
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - t) / n * 1e6


def print_profile(fn, n: int = 500, sync=None, top: int = 18) -> None:
    """cProfile of n fn() calls (sync after the loop, so queued GPU work counts), top entries by own time."""
    import cProfile
    import pstats
    if sync:
        sync()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    if sync:
        sync()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(top)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (the memory ceiling)."""
    src = cupy.ones(nbytes // 4, cupy.float32)
    dst = cupy.empty_like(src)
    stream = cupy.cuda.get_current_stream()
    for _ in range(30):  # bring the clocks up before timing
        dst.data.copy_from_device_async(src.data, nbytes, stream)
    times = []
    for _ in range(30):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record(stream)
        dst.data.copy_from_device_async(src.data, nbytes, stream)
        b.record(stream)
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def print_table(title: str, header: list, rows: list) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print(" | ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def save_json(name: str, data) -> None:
    """data as JSON into $OUT or $FI_CUPY_BENCH_DIR (nothing when neither is set); a dict gets the run's
    "date" (local time, ISO 8601) unless it has one, for the titles of bench/plot.py's charts."""
    out = os.environ.get("OUT") or os.environ.get("FI_CUPY_BENCH_DIR")
    if out:
        if isinstance(data, dict) and "date" not in data:
            data = {**data, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        with open(os.path.join(out, name), "w") as f:
            json.dump(data, f, indent=1)
