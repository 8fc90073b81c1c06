"""Device-time breakdown of a saved torch.profiler Chrome trace: the same categories, idle time and top kernels as
titanmm's own `rank{r}_kernels.txt`, for a trace written by another trainer (torchtitan's
`profile_traces/iteration_N/rank0_trace.json`), so that both sides of a comparison are read the same way.

    python benchmarks/trace_breakdown.py TRACE.json[.gz] [--title T] [--out FILE]

The wall time spans the trace's ProfilerStep ranges, stretched to the kernels that end after them.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import print_report  # noqa: E402
from titanmm.utils.profiling import kernel_breakdown  # noqa: E402

DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def load_trace(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)


def trace_breakdown(trace: dict, title: str = "") -> str:
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    kernels = [(e["name"], float(e["ts"]), float(e.get("dur", 0.0))) for e in events
               if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES]
    if not kernels:
        raise ValueError("the trace has no device events (kernels, memcpy, memset)")
    steps = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))) for e in events
             if e.get("ph") == "X" and str(e.get("name", "")).startswith("ProfilerStep")]
    spans = steps + [(start, start + duration) for _, start, duration in kernels]
    wall_us = max(end for _, end in spans) - min(start for start, _ in spans)
    return kernel_breakdown(kernels, wall_us, title=title)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", default=None, help="write the breakdown here as well as to stdout")
    args = parser.parse_args(argv)
    text = trace_breakdown(load_trace(Path(args.trace)), args.title or args.trace)
    print_report(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
