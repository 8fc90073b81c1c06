"""benchmarks/optimizer_step.py on the CPU (one gloo rank, its own process): the norm and the clipped AdamW step
timed for plain parameters with random gradients and for FSDP2 shards with the gradients of a real backward, with
the bytes and bandwidth fields of its results file."""

import json
import subprocess
import sys

import pytest

from tests.utils import REPO


@pytest.mark.parametrize("fsdp,backward_seq", [(False, 0), (True, 32)])
def test_optimizer_step_benchmark(tmp_path, fsdp, backward_seq):
    out = tmp_path / "optimizer.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "optimizer_step.py"), "--flavor", "debug", "--warmup", "1",
           "--iters", "2", "--json", str(out)] + (["--fsdp"] if fsdp else []) + (
        ["--backward-seq", str(backward_seq)] if backward_seq else [])
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["fsdp"] is fsdp and result["ranks"] == 1 and result["params_per_rank"] > 0
    assert result["adamw_bytes_per_rank"] == 28 * result["params_per_rank"] and result["grad_norm_ms"] > 0
    assert result["gradients"] == (f"one backward of {backward_seq} tokens" if backward_seq else "random")
    assert set(result["implementations"]) == {"fused", "compiled", "foreach"}
    for r in result["implementations"].values():
        assert r["ms"] > 0 and r["bytes_per_s"] > 0 and r["fraction_of_copy_bandwidth"] > 0 and r["first_step_s"] > 0
    assert result["commit"] and result["command"].startswith("python benchmarks/optimizer_step.py")
