"""FP8 against bf16 GEMMs at the shapes of one Llama 3 8B block's training step: the speedup `fp8_bound.py` needs.

    python benchmarks/fp8_gemm_shapes.py [--flavor llama3_8b] [--tokens 8192] [--iters 50] [--json OUT.json]

For each linear of a block (q, k, v, o, w1, w3, w2) the three products of a training step: the forward (tokens x in
-> out), the input gradient (tokens x out -> in) and the weight gradient (out x tokens -> in), in bf16 (`torch.mm`)
and in float8 e4m3 with tensorwise scales (`torch._scaled_mm`, bf16 output: what torchao's tensorwise recipe calls).
Each product is checked against the bf16 one on fresh random inputs (relative error of the FP8 product below 0.1),
then timed with CUDA events (median of --iters, over 4 rotating input sets). The summed times give the FP8 / bf16
speedup of a block's GEMMs, quantisation left out (only the products are timed, not the casts).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_io  # noqa: E402
from device_timing import median_event_ms  # noqa: E402
from titanmm.models.llama import LLAMA_FLAVORS, TransformerArgs  # noqa: E402

SETS = 4


def block_linears(args: TransformerArgs) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear of one block."""
    q, kv, dim, hidden = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.dim, args.ffn_hidden_dim
    return {"q": (dim, q), "k": (dim, kv), "v": (dim, kv), "o": (q, dim), "w1": (dim, hidden), "w3": (dim, hidden),
            "w2": (hidden, dim)}


def products(args: TransformerArgs, tokens: int) -> list[tuple[str, int, int, int]]:
    """(name, M, K, N) of every GEMM of one block's forward and backward."""
    rows = []
    for name, (fan_in, fan_out) in block_linears(args).items():
        rows += [(f"{name} forward", tokens, fan_in, fan_out), (f"{name} input grad", tokens, fan_out, fan_in),
                 (f"{name} weight grad", fan_out, tokens, fan_in)]
    return rows


def to_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensorwise e4m3 (amax scaling) and the inverse scale _scaled_mm takes."""
    scale = torch.finfo(torch.float8_e4m3fn).max / x.abs().amax().float().clamp(min=1e-12)
    return (x.float() * scale).to(torch.float8_e4m3fn), scale.reciprocal()


def measure(m: int, k: int, n: int, iters: int) -> dict:
    a = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(SETS)]
    b = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(SETS)]  # [N, K]: column-major B
    a8, b8 = [to_fp8(x) for x in a], [to_fp8(x) for x in b]  # (e4m3 tensor, inverse scale) pairs

    def bf16_mm(i: int) -> torch.Tensor:
        return torch.mm(a[i], b[i].t())

    def fp8_mm(i: int) -> torch.Tensor:
        (x, x_scale), (w, w_scale) = a8[i], b8[i]
        return torch._scaled_mm(x, w.t(), x_scale, w_scale, out_dtype=torch.bfloat16)

    reference = a[0].float() @ b[0].float().t()
    error = ((fp8_mm(0).float() - reference).norm() / reference.norm()).item()
    if not error < 0.1:
        raise AssertionError(f"FP8 product {m}x{k}x{n}: relative error {error:.3g}")
    rotation = itertools.count()  # each call takes the next input set
    bf16_ms = median_event_ms(lambda: bf16_mm(next(rotation) % SETS), iters)
    fp8_ms = median_event_ms(lambda: fp8_mm(next(rotation) % SETS), iters)
    flops = 2 * m * k * n
    return {"bf16_ms": bf16_ms, "fp8_ms": fp8_ms, "bf16_tflops": flops / bf16_ms / 1e9,
            "fp8_tflops": flops / fp8_ms / 1e9, "fp8_relative_error": error}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavor", default="llama3_8b", choices=sorted(LLAMA_FLAVORS))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rows = []
    print(f"{'product':<18} {'M x K x N':>20} {'bf16 ms':>8} {'fp8 ms':>8} {'speedup':>8}")
    for name, m, k, n in products(LLAMA_FLAVORS[args.flavor], args.tokens):
        r = {"product": name, "m": m, "k": k, "n": n, **measure(m, k, n, args.iters)}
        rows.append(r)
        print(f"{name:<18} {f'{m}x{k}x{n}':>20} {r['bf16_ms']:8.3f} {r['fp8_ms']:8.3f} "
              f"{r['bf16_ms'] / r['fp8_ms']:8.2f}")
    bf16, fp8 = sum(r["bf16_ms"] for r in rows), sum(r["fp8_ms"] for r in rows)
    print(f"one block: bf16 {bf16:.2f} ms, fp8 {fp8:.2f} ms: FP8 GEMMs {bf16 / fp8:.2f}x faster")
    if args.json:
        results_io.write_results({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                  "flavor": args.flavor, "tokens": args.tokens, "commit": results_io.commit(),
                                  "command": results_io.command_line("fp8_gemm_shapes.py", argv),
                                  "block_bf16_ms": bf16, "block_fp8_ms": fp8, "block_speedup": bf16 / fp8,
                                  "rows": rows}, Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
