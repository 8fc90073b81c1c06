"""How much faster can FP8 training be than bf16? An upper bound read from a bf16 step's kernel breakdown.

    python benchmarks/fp8_bound.py BF16_KERNELS.txt [--flavor llama3_8b] [--layers N] [--fp8-speedup S] [--json OUT]

FP8 tensorwise training (torchao's Float8Linear, in titanmm and in torchtitan) runs the GEMMs of the blocks' linear
layers (forward and both backward products) in float8 and everything else as in bf16: attention (cuDNN, bf16),
norms, RoPE and SwiGLU, the optimizer, FSDP2's collectives and copies, and the output layer (both trainers keep it
in bf16). Taking away only what those GEMMs can save, an FP8 step lasts at least

    t_fp8 >= t_bf16 - M_blocks x (1 - 1 / s)

with t_bf16 the bf16 step's wall time, M_blocks the part of its matmul kernel time spent in the blocks' linears
(the breakdown's matmul time split by FLOPs between the blocks and the output layer: 6 x parameters each) and s the
FP8 / bf16 matmul throughput: by default the two ceilings measured on an H100 (`_scaled_mm` 1,422 and bf16 777
TFLOP/s at 8192^3, ../shared/peers/README.md), i.e. FP8 GEMMs reaching the same share of their ceiling as the bf16
ones reach of theirs. The bound leaves out what FP8 adds (amax reductions, scaling casts, transposed copies) and
assumes that communication stays hidden as the compute shrinks, so a real run stays below it. Also printed: the bound
with the output layer in FP8 too, and with the blocks' GEMMs at the full FP8 ceiling (the bf16 GEMMs' measured rate
given, FLOPs / M).

A profiled step runs slower than an unprofiled one (the tracer's cost per kernel), so the profile's wall time and
matmul share may not be the real step's: `--step-ms` (the unprofiled run's step time, e.g. tokens per step over
tokens/s) gives a second reading, the matmul kernels at their profiled durations inside the real step; the truth
lies between the two when the tracer's cost falls on the small kernels more than on the GEMMs.

`BF16_KERNELS.txt` is a `rank{r}_kernels.txt` that titanmm's profiler wrote for one bf16 step
(`[profiling] enable_profiling`), of a run that recomputes no matmul in backward (`op_all_matmuls` or no
activation checkpointing), so that its matmul time is one forward and one backward of every linear.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_io  # noqa: E402
from fp8_gemm_shapes import block_linears  # noqa: E402
from titanmm.models.llama import LLAMA_FLAVORS, TransformerArgs  # noqa: E402

BF16_MATMUL_CEILING, FP8_MATMUL_CEILING = 777e12, 1422e12  # FLOP/s, one H100 (../shared/peers/README.md)


def read_breakdown(text: str) -> dict[str, float]:
    """{"wall": ms, "steps": n, <category>: ms, ...} from a titanmm kernels.txt (first block of the report)."""
    values: dict[str, float] = {}
    header = re.search(r"\((\d+) profiled steps?\)", text)
    values["steps"] = int(header.group(1)) if header else 1
    wall = re.search(r"^wall time\s+([\d.]+) ms", text, re.MULTILINE)
    if wall is None:
        raise ValueError("not a kernel breakdown: no 'wall time' line")
    values["wall"] = float(wall.group(1))
    categories = text.split("category", 1)[1].split("top ", 1)[0] if "category" in text else ""
    for line in categories.splitlines():
        match = re.match(r"^(\S[\w/ ]*?)\s{2,}([\d.]+)\s", line)
        if match and match.group(1) != "idle":
            values[match.group(1)] = float(match.group(2))
    if "matmul" not in values:
        raise ValueError("not a kernel breakdown: no 'matmul' category")
    return values


def linear_params(args: TransformerArgs) -> tuple[int, int]:
    """(parameters of all blocks' linear layers, parameters of the output layer)."""
    per_block = sum(fan_in * fan_out for fan_in, fan_out in block_linears(args).values())
    return args.n_layers * per_block, args.vocab_size * args.dim


def fp8_bound(breakdown: dict[str, float], args: TransformerArgs, tokens_per_step: int,
              fp8_speedup: float = FP8_MATMUL_CEILING / BF16_MATMUL_CEILING, step_ms: float | None = None) -> dict:
    """The FP8 / bf16 step-time bounds of the module docstring, per step (`step_ms`: the real step's time, in place
    of the profiled wall time)."""
    steps = breakdown["steps"]
    wall, matmul = breakdown["wall"] / steps, breakdown["matmul"] / steps
    if step_ms is not None:
        wall = step_ms
    blocks, output = linear_params(args)
    block_share = blocks / (blocks + output)
    block_ms, output_ms = matmul * block_share, matmul * (1 - block_share)
    saving = 1 - 1 / fp8_speedup
    block_flops = 6 * blocks * tokens_per_step
    bf16_rate = block_flops / (block_ms / 1e3)
    at_ceiling_ms = block_flops / FP8_MATMUL_CEILING * 1e3
    return {
        "bf16_step_ms": wall, "matmul_ms": matmul, "block_linear_ms": block_ms, "output_layer_ms": output_ms,
        "block_share_of_matmul_flops": block_share, "fp8_speedup": fp8_speedup,
        "bf16_block_gemm_tflops": bf16_rate / 1e12,
        "bound_ratio": wall / (wall - block_ms * saving),
        "bound_ratio_fp8_output_layer": wall / (wall - matmul * saving),
        "bound_ratio_fp8_at_ceiling": wall / (wall - block_ms + at_ceiling_ms),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kernels", help="a bf16 step's rank{r}_kernels.txt written by titanmm's profiler")
    parser.add_argument("--flavor", default="llama3_8b", choices=sorted(LLAMA_FLAVORS))
    parser.add_argument("--layers", type=int, default=None, help="the run's model.n_layers (default: the flavor's)")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per GPU and step (seq_len x local batch)")
    parser.add_argument("--fp8-speedup", type=float, default=FP8_MATMUL_CEILING / BF16_MATMUL_CEILING,
                        help="FP8 / bf16 matmul throughput (default: the ceilings measured on an H100)")
    parser.add_argument("--step-ms", type=float, default=None,
                        help="the unprofiled run's step time: a second reading with the profiled matmul durations")
    parser.add_argument("--json", default=None, help="write the bound here")
    args = parser.parse_args(argv)
    model = LLAMA_FLAVORS[args.flavor]
    if args.layers is not None:
        model = dataclasses.replace(model, n_layers=args.layers)
    try:
        breakdown = read_breakdown(Path(args.kernels).read_text())
    except (OSError, ValueError) as e:
        parser.error(f"{args.kernels}: {e}")
    readings = {"profiled_step": fp8_bound(breakdown, model, args.tokens, args.fp8_speedup)}
    if args.step_ms is not None:
        readings["real_step"] = fp8_bound(breakdown, model, args.tokens, args.fp8_speedup, args.step_ms)
    for name, bound in readings.items():
        _print(name, bound)
    if args.json:
        results_io.write_results({"kernels": Path(args.kernels).name, "flavor": args.flavor,
                                  "n_layers": model.n_layers, "tokens_per_step": args.tokens,
                                  "command": results_io.command_line("fp8_bound.py", argv),
                                  "commit": results_io.commit(), **readings}, Path(args.json))
    return 0


def _print(reading: str, bound: dict) -> None:
    print(f"{reading}: bf16 step {bound['bf16_step_ms']:.1f} ms, matmuls {bound['matmul_ms']:.1f} ms "
          f"(blocks' linears {bound['block_linear_ms']:.1f} at {bound['bf16_block_gemm_tflops']:.0f} TFLOP/s, "
          f"output layer {bound['output_layer_ms']:.1f})")
    print(f"FP8 / bf16 at most {bound['bound_ratio']:.3f}x (FP8 GEMMs {bound['fp8_speedup']:.2f}x faster); "
          f"{bound['bound_ratio_fp8_output_layer']:.3f}x with the output layer in FP8 too; "
          f"{bound['bound_ratio_fp8_at_ceiling']:.3f}x with the blocks' GEMMs at the full FP8 ceiling")


if __name__ == "__main__":
    sys.exit(main())
