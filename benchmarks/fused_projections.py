"""Would fused projections pay on this GPU? One transformer block's q/k/v and w1/w3 projections of Llama 3 8B at 8,192
tokens, forward and backward in bf16, as separate matmuls (titanmm's and torchtitan's layout) against one matmul
over the concatenated weights (Megatron's linear_qkv / linear_fc1), the concatenation itself included.

    python benchmarks/fused_projections.py [--tokens 8192] [--json OUT.json]
    python benchmarks/fused_projections.py --tokens 32 --forward-only    (a decode step at batch 32)

Reports the median milliseconds (CUDA events, --iters) of each variant per block and x 32 blocks per step: the
saving bounds what fusing could give a training step before any other effect.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_timing import median_event_ms  # noqa: E402

DIM, KV_DIM, HIDDEN, LAYERS = 4096, 1024, 14336, 32
GROUPS = {"qkv": [DIM, KV_DIM, KV_DIM], "w1_w3": [HIDDEN, HIDDEN]}  # output widths of projections of one input


def separate(x, weights, grads_out):
    outputs = [F.linear(x, w) for w in weights]
    if grads_out is not None:
        torch.autograd.backward(outputs, grads_out)


def fused(x, weights, grads_out):
    out = F.linear(x, torch.cat(weights))
    if grads_out is not None:
        torch.autograd.backward([out], [torch.cat(grads_out, dim=-1)])


def fused_weights_ready(x, fused_weight, widths):
    """Decoding with the weights concatenated once beforehand (what a generate-time fusion would do)."""
    return F.linear(x, fused_weight).split(widths, dim=-1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--forward-only", action="store_true", help="no backward (decoding)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a GPU")
    rows = []
    print(f"{'group':<8} {'separate ms':>12} {'fused ms':>10} {'saved per step ms':>18}"
          + (f" {'pre-fused ms':>13}" if args.forward_only else ""))
    for group, widths in GROUPS.items():
        train = not args.forward_only
        x = torch.randn(args.tokens, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=train)
        weights = [torch.randn(n, DIM, device="cuda", dtype=torch.bfloat16, requires_grad=train) for n in widths]
        grads_out = [torch.randn(args.tokens, n, device="cuda", dtype=torch.bfloat16) for n in widths] if train \
            else None

        def run(fn):
            x.grad = None
            for w in weights:
                w.grad = None
            with torch.set_grad_enabled(train):
                fn(x, weights, grads_out)

        ms_separate = median_event_ms(lambda: run(separate), args.iters)
        ms_fused = median_event_ms(lambda: run(fused), args.iters)
        row = {"group": group, "separate_ms": ms_separate, "fused_ms": ms_fused,
               "saved_per_step_ms": (ms_separate - ms_fused) * LAYERS}
        line = f"{group:<8} {ms_separate:>12.3f} {ms_fused:>10.3f} {(ms_separate - ms_fused) * LAYERS:>18.1f}"
        if args.forward_only:
            fused_weight = torch.cat(weights)
            row["pre_fused_ms"] = median_event_ms(lambda: fused_weights_ready(x, fused_weight, widths), args.iters)
            line += f" {row['pre_fused_ms']:>13.3f}"
        rows.append(row)
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                               "tokens": args.tokens, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
