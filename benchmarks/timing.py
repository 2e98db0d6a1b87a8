"""The one timing helper the benchmark scripts share."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, reps: int = 10, warmup: int = 2, cuda: bool = True) -> float:
    """Median milliseconds of fn() over `reps` calls after `warmup` calls: CUDA events around each call on a
    GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def median_host_ms(fn, reps: int = 10, cuda: bool = True) -> float:
    """Median (the upper one for an even count) host milliseconds of fn() with the device idle at its start: the
    time until fn returns, its launches queued (the device may still be running them). Above the device time, the
    call is bound by the host."""
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    if cuda:
        torch.cuda.synchronize()
    return sorted(times)[reps // 2]
