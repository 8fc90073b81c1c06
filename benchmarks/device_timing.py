"""Timing on one device, shared by the benchmark scripts: the median of repeated calls (host clock, or CUDA
events for short kernels), the bandwidth of a device-to-device copy and the FLOP rate of a matmul (the two ceilings
a roofline is drawn from)."""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, warmup: int = 2, iters: int = 10) -> float:
    """Median wall seconds of `fn()` over `iters` calls after `warmup` untimed ones, the device synchronized
    around each call (so all of its work, on every stream it waits for, is counted)."""
    times = []
    for i in range(warmup + iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_event_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` on the current CUDA stream over `iters` calls after `warmup` untimed ones, each
    timed by CUDA events around it (for short kernels, where a host clock would count the launch)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(device: torch.device, gib: float = 4.0, iters: int = 10) -> float:
    """Bytes per second moved (read + written) by `dst.copy_(src)` of a `gib` GiB buffer, median of `iters`."""
    bandwidth = _copy_bandwidth(device, gib, iters)
    if device.type == "cuda":  # the buffers are gone: give their memory back for what is measured next
        torch.cuda.empty_cache()
    return bandwidth


def _copy_bandwidth(device: torch.device, gib: float, iters: int) -> float:
    src = torch.ones(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / median_seconds(lambda: dst.copy_(src), device, iters=iters)


def matmul_throughput(device: torch.device, dtype: torch.dtype, n: int | None = None, iters: int = 10) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (n = 8192 on a GPU, 256 on a CPU), median of `iters`."""
    n = n or (8192 if device.type == "cuda" else 256)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, device, iters=iters)
