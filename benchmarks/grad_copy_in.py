"""FSDP2's reduce-scatter copy-in on one GPU: torch._chunk_cat (FSDP2's kernel) against titanmm's one strided copy
per gradient (titanmm.parallel.grad_copy_in), for the gradients of each FSDP2 unit of Llama 3 8B.

    python benchmarks/grad_copy_in.py [--worlds 2 4 8] [--json OUT.json]

For each unit (a transformer block, the token embedding, the final norm + output layer), world size, and dtype pair
(bf16 gradients into a float32 or bf16 buffer) it checks that both give the same bytes and reports each one's
median time over --iters (CUDA events) and the bandwidth that implies (gradient bytes read + buffer bytes written).
Per step the blocks' copies run 32 times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from titanmm.parallel.grad_copy_in import chunk_cat_per_parameter  # noqa: E402

DIM, KV_DIM, HIDDEN, VOCAB = 4096, 1024, 14336, 128256
UNITS = {  # Llama 3 8B's FSDP2 units (titanmm.parallel.fsdp): their parameters' shapes in registration order
    "block": [(DIM, DIM), (KV_DIM, DIM), (KV_DIM, DIM), (DIM, DIM), (HIDDEN, DIM), (DIM, HIDDEN), (HIDDEN, DIM),
              (DIM,), (DIM,)],
    "embedding": [(VOCAB, DIM)],
    "norm_output": [(DIM,), (VOCAB, DIM)],
}


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a GPU")
    rows = []
    print(f"{'unit':<12} {'world':>5} {'into':>8} {'chunk_cat ms':>13} {'per-param ms':>13} {'GB/s chunk_cat':>15} "
          f"{'GB/s per-param':>15}")
    for unit, shapes in UNITS.items():
        grads = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
        for world in args.worlds:
            for out_dtype in (torch.float32, torch.bfloat16):
                numel = sum(-(-s[0] // world) * world * (torch.Size(s).numel() // s[0]) for s in shapes)
                expected = torch.empty(world, numel // world, device="cuda", dtype=out_dtype)
                ours = torch.empty_like(expected)
                torch._chunk_cat(grads, 0, world, out=expected)
                chunk_cat_per_parameter(grads, 0, world, out=ours)
                if not torch.equal(expected, ours):
                    raise AssertionError(f"{unit}, world {world}, {out_dtype}: the copies differ")
                ms_torch = time_ms(lambda: torch._chunk_cat(grads, 0, world, out=expected), args.iters)
                ms_ours = time_ms(lambda: chunk_cat_per_parameter(grads, 0, world, out=ours), args.iters)
                moved = sum(g.numel() * g.element_size() for g in grads) + expected.numel() * expected.element_size()
                into = str(out_dtype).removeprefix("torch.")
                rows.append({"unit": unit, "world": world, "into": into, "chunk_cat_ms": ms_torch,
                             "per_parameter_ms": ms_ours, "bytes_moved": moved})
                print(f"{unit:<12} {world:>5} {into:>8} {ms_torch:>13.3f} {ms_ours:>13.3f} "
                      f"{moved / ms_torch / 1e6:>15,.0f} {moved / ms_ours / 1e6:>15,.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
