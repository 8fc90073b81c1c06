"""benchmarks/fp8_bound.py and fp8_gemm_shapes.py: the FP8 / bf16 bound read from a bf16 kernel breakdown, and the
GEMM shapes of one block's training step."""

import json

import pytest
import torch

from tests.utils import REPO, load_benchmark
from titanmm.models.llama import LLAMA_FLAVORS

fp8_bound = load_benchmark("fp8_bound")
fp8_gemm_shapes = load_benchmark("fp8_gemm_shapes")

BREAKDOWN = """rank 0, step 10 (1 profiled step)
source: CUDA kernels on the device timeline, all streams
wall time         1000.00 ms          first profiled step's start to the end of the last one
busy time          990.00 ms   99.0%  union of the kernel intervals

category                ms  % kernels   % wall
communication       200.00      18.1%    22.5%
matmul              600.00      50.4%    62.5%
copies/casts         50.00       4.3%     5.3%
idle                 10.00                1.0%

top 30 kernels by total time
        ms  % kernels   calls  name
    158.96      13.2%     217  nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT
"""


def test_bound_from_a_breakdown():
    breakdown = fp8_bound.read_breakdown(BREAKDOWN)
    assert breakdown == {"steps": 1, "wall": 1000.0, "communication": 200.0, "matmul": 600.0, "copies/casts": 50.0}
    args = LLAMA_FLAVORS["llama3_8b"]
    blocks, output = fp8_bound.linear_params(args)
    assert blocks == 32 * 218_103_808 and output == 128256 * 4096
    bound = fp8_bound.fp8_bound(breakdown, args, 8192, fp8_speedup=2.0)
    share = blocks / (blocks + output)
    assert bound["block_linear_ms"] == pytest.approx(600 * share)
    assert bound["bound_ratio"] == pytest.approx(1000 / (1000 - 300 * share))  # half the blocks' GEMM time saved
    assert bound["bound_ratio_fp8_output_layer"] == pytest.approx(1000 / 700)
    with pytest.raises(ValueError, match="no 'wall time'"):
        fp8_bound.read_breakdown("matmul 1.0")


def test_bound_of_a_recorded_profile(tmp_path):
    kernels = REPO / "benchmarks/results/2026-11-23_h200x2_llama3_8b_bf16_fdfb9d0_titanmm_rank0_kernels.txt"
    out = tmp_path / "bound.json"
    assert fp8_bound.main([str(kernels), "--step-ms", "856.8", "--json", str(out)]) == 0
    readings = json.loads(out.read_text())
    # the same matmul time in a shorter (unprofiled) step bounds the ratio higher
    assert 1.3 < readings["profiled_step"]["bound_ratio"] < readings["real_step"]["bound_ratio"] < 1.5


def test_gemm_shapes_cover_a_block():
    args = LLAMA_FLAVORS["llama3_8b"]
    rows = fp8_gemm_shapes.products(args, 8192)
    assert len(rows) == 21 and ("k forward", 8192, 4096, 1024) in rows and ("w2 weight grad", 4096, 8192, 14336) in rows
    # forward + both backward products: 6 FLOPs per parameter and token, the count fp8_bound.py splits time by
    block_params = fp8_bound.linear_params(args)[0] // args.n_layers
    assert sum(2 * m * k * n for _, m, k, n in rows) == 6 * block_params * 8192
    x = torch.randn(256, 64)
    x8, inverse_scale = fp8_gemm_shapes.to_fp8(x)
    assert x8.dtype == torch.float8_e4m3fn
    assert ((x8.float() * inverse_scale - x).norm() / x.norm()).item() < 0.05
