"""Can a memory-bound fused AdamW step hide under a compute-bound forward on one GPU?

A feasibility probe for overlapping step k's optimizer with step k+1's forward: it times, on the GPU,
(a) a forward-shaped chain of bf16 GEMMs and causal attention at Llama 3 8B's width (`--layers` blocks,
sequence `--seq`), (b) torch's fused AdamW over `--opt-params` fp32 parameters split into per-block groups,
(c) both at once, the optimizer on a side stream, the chain on the default stream or on a high-priority stream.
The hidden fraction is (a + b - c) / b.

    python benchmarks/optimizer_overlap.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_io  # noqa: E402
from device_timing import median_seconds  # noqa: E402


def forward_chain(x, weights, seq: int):
    for w_qkv, w_o, w_13, w_2 in weights:
        qkv = x @ w_qkv
        q, k, v = qkv.split([4096, 1024, 1024], dim=-1)
        q = q.view(1, seq, 32, 128).transpose(1, 2)
        k = k.view(1, seq, 8, 128).transpose(1, 2).repeat_interleave(4, dim=1)
        v = v.view(1, seq, 8, 128).transpose(1, 2).repeat_interleave(4, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(seq, 4096)
        x = x + a @ w_o
        h = x @ w_13
        g, u = h.chunk(2, dim=-1)
        x = x + (F.silu(g) * u) @ w_2
    return x


def timed(fn, iters: int) -> float:
    """Median milliseconds of `fn` on the current GPU."""
    return 1e3 * median_seconds(fn, torch.device("cuda"), warmup=0, iters=iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--opt-params", type=float, default=2.8e9, help="fp32 parameters the optimizer updates")
    parser.add_argument("--groups", type=int, default=10, help="optimizer groups (one step call each)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    bf = dict(device=dev, dtype=torch.bfloat16)
    weights = [(torch.randn(4096, 6144, **bf) * 0.02, torch.randn(4096, 4096, **bf) * 0.02,
                torch.randn(4096, 28672, **bf) * 0.02, torch.randn(14336, 4096, **bf) * 0.02)
               for _ in range(args.layers)]
    x = torch.randn(args.seq, 4096, **bf)
    per_group = int(args.opt_params / args.groups)
    optimizers = []
    for _ in range(args.groups):
        p = torch.nn.Parameter(torch.randn(per_group, device=dev) * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        optimizers.append(torch.optim.AdamW([p], lr=1e-4, fused=True))

    def chain():
        with torch.no_grad():
            forward_chain(x, weights, args.seq)

    def optimize():
        for o in optimizers:
            o.step()

    side = torch.cuda.Stream()
    high = torch.cuda.Stream(priority=-1)

    def both(main_stream):
        def run():
            cur = torch.cuda.current_stream()
            side.wait_stream(cur)
            main_stream.wait_stream(cur)
            with torch.cuda.stream(side):
                optimize()
            with torch.cuda.stream(main_stream):
                chain()
            cur.wait_stream(side)
            cur.wait_stream(main_stream)
        return run

    for fn in (chain, optimize, both(torch.cuda.current_stream()), both(high)):
        timed(fn, 2)
    results = {"date": time.strftime("%Y-%m-%d"), "commit": results_io.commit(),
               "command": results_io.command_line("optimizer_overlap.py", None),
               "device": torch.cuda.get_device_name(), "layers": args.layers, "seq": args.seq,
               "opt_params": args.opt_params, "groups": args.groups,
               "chain_ms": timed(chain, args.iters), "optimizer_ms": timed(optimize, args.iters),
               "both_default_priority_ms": timed(both(torch.cuda.current_stream()), args.iters),
               "both_high_priority_chain_ms": timed(both(high), args.iters)}
    serial = results["chain_ms"] + results["optimizer_ms"]
    for key in ("both_default_priority_ms", "both_high_priority_chain_ms"):
        results[key.replace("_ms", "_hidden_fraction")] = (serial - results[key]) / results["optimizer_ms"]
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
