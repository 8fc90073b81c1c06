"""benchmarks/trace_breakdown.py on a small hand-made Chrome trace: categories, idle time, wall time from the
ProfilerStep range, gzip input."""

import gzip
import json

import pytest

from tests.utils import load_benchmark

trace_breakdown = load_benchmark("trace_breakdown")


def _trace():
    return {"traceEvents": [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#10", "ts": 0, "dur": 1000},
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "ts": 100, "dur": 500},
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllGather_RING_LL", "ts": 200, "dur": 300},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 700, "dur": 100},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 50, "dur": 20},
    ]}


def test_breakdown_of_a_trace(tmp_path):
    path = tmp_path / "rank0_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(_trace(), f)
    out = tmp_path / "kernels.txt"
    assert trace_breakdown.main([str(path), "--title", "peer step 10", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("peer step 10")
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert lines["wall"][2] == "1.00" and lines["busy"][2] == "0.60"  # 100-600 and 700-800 of 0-1000 us
    assert lines["idle"][1] == "0.40"  # the category table's idle row
    assert lines["matmul"][1] == "0.50" and lines["communication"][1] == "0.30"


def test_trace_without_kernels_is_an_error():
    with pytest.raises(ValueError, match="no device events"):
        trace_breakdown.trace_breakdown({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0}]})
