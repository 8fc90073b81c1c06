"""Causal attention forward + backward through each scaled_dot_product_attention backend (and FlexAttention).

    python benchmarks/attention_backends.py [--seq 8192] [--heads 32] [--kv-heads 8] [--head-dim 128] [--json F]

Llama 3 8B's attention at seq 8192 by default, bf16. Grouped-query heads go in as they are (enable_gqa) and,
for backends that refuse them, with K/V repeated to the query heads (the repeat is timed too). Reports ms per
forward + backward and the TFLOP/s of the causal half of the attention matrix (4 * B * H * S^2 * D flops
forward, 2.5x that for forward + backward).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--json")
    a = p.parse_args(argv)
    dev, dt = "cuda", torch.bfloat16
    b, s, h, kvh, d = a.batch, a.seq, a.heads, a.kv_heads, a.head_dim
    q = torch.randn(b, h, s, d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(b, kvh, s, d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(b, kvh, s, d, device=dev, dtype=dt, requires_grad=True)
    grad = torch.randn(b, h, s, d, device=dev, dtype=dt)
    flops = 2.5 * 4 * b * h * s * s * d / 2  # causal: half the matrix
    reference = None
    results = {}

    def run(name, attend):
        nonlocal reference
        def step():
            q.grad = k.grad = v.grad = None
            out = attend(q, k, v)
            out.backward(grad)
            return out
        try:
            out = step()
            err = 0.0 if reference is None else (out.float() - reference).abs().max().item()
            if reference is None:
                reference = out.detach().float()
            ms = time_ms(step)
            results[name] = {"ms": ms, "tflops": flops / ms / 1e9, "max_abs_err_vs_first": err}
            print(f"{name:40s} {ms:8.2f} ms  {flops / ms / 1e9:7.1f} TFLOP/s  max|diff| {err:.2e}", flush=True)
        except Exception as e:  # a backend that refuses these inputs
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(f"{name:40s} refused: {results[name]['error']}", flush=True)

    def sdpa(backend, gqa_native):
        def attend(q, k, v):
            with sdpa_kernel([backend]):
                if gqa_native:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=h != kvh)
                rep = h // kvh
                return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                      is_causal=True)
        return attend

    print(f"B={b} S={s} H={h} KV={kvh} D={d} bf16, torch {torch.__version__}, {torch.cuda.get_device_name()}")
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        run(f"{backend.name} enable_gqa", sdpa(backend, True))
        run(f"{backend.name} repeat_kv", sdpa(backend, False))
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        compiled = torch.compile(sdpa(backend, True))
        run(f"{backend.name} enable_gqa compiled", compiled)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    mask = create_block_mask(lambda b_, h_, qi, ki: qi >= ki, None, None, s, s, device=dev)
    flex = torch.compile(flex_attention)
    run("flex_attention (compiled)", lambda q, k, v: flex(q, k, v, block_mask=mask, enable_gqa=h != kvh))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "shape": dict(batch=b, seq=s, heads=h, kv_heads=kvh, head_dim=d), "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
