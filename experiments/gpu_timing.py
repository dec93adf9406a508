"""CUDA-graph timing shared by the GPU benchmarks.

METHOD.md: for many small launches, capture a graph and time its replays (launch gaps shrink).
`calls` are closures cycled round-robin, so inputs rotate beyond the L2 when the caller passes
one closure per input set. Warm-up runs eagerly, then once on a side stream (torch's recipe
before a capture), then one replay before the timed ones.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GraphTiming:
    seconds: float  # median seconds per call
    mode: str  # "graph", or "stream" where capture failed and fallback was allowed
    spread: float  # (max - min) / median over the replays


def _seconds_per_pass(calls) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for c in calls:
        c()
    end.record()
    end.synchronize()
    return max(start.elapsed_time(end), 1e-3) / 1e3


def capture_graph(calls, reps: int):
    """A CUDA graph of `reps` rounds of `calls`, run once eagerly first on a side stream (warm-up
    and allocations outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for c in calls:
                c()
    return graph


def time_graph(calls, target_ms: float = 8.0, replays: int = 7, max_calls: int = 2000,
               fallback: bool = False, log=print) -> GraphTiming:
    """Median time per call over `replays` replays of one graph holding ~target_ms of calls."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    pass_s = _seconds_per_pass(calls)
    reps = max(1, min(math.ceil(target_ms / 1e3 / pass_s), max(1, max_calls // len(calls))))
    try:
        graph = capture_graph(calls, reps)
        run, mode = graph.replay, "graph"
    except Exception as exc:
        if not fallback:
            raise
        log(f"    graph capture failed ({type(exc).__name__}: {exc}); timing plain launches")
        torch.cuda.synchronize()
        graph = None

        def run():
            for _ in range(reps):
                for c in calls:
                    c()
        mode = "stream"
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (reps * len(calls)))
    del graph
    med = statistics.median(times)
    return GraphTiming(med, mode, (max(times) - min(times)) / med)
