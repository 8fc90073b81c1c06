"""benchmarks/decode_throughput.py on the CPU with the debug flavor: results file and the --profile breakdown."""

import json

from benchmarks import decode_throughput


def test_decode_benchmark_writes_results_and_profiles(tmp_path):
    out = tmp_path / "decode.json"
    assert decode_throughput.main(["--flavor", "debug", "--batch", "1", "3", "--prompt-len", "8", "--new-tokens", "4",
                                   "--warmup", "1", "--iters", "1", "--device", "cpu", "--dtype", "fp32",
                                   "--json", str(out), "--profile", str(tmp_path / "profile")]) == 0
    result = json.loads(out.read_text())
    assert set(result["batches"]) == {"1", "3"} and 0 < result["batches"]["1"]["bandwidth_bound_fraction"]
    breakdown = (tmp_path / "profile" / "decode_B3_kernels.txt").read_text()
    assert "generate, batch 3, 8 + 4 tokens" in breakdown and "matmul" in breakdown
    assert (tmp_path / "profile" / "decode_B3_trace.json").exists()
