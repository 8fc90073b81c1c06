"""The optimizer step alone, as the trainer runs it: gradient norm + clipped fused AdamW over a Llama's parameters.

    python benchmarks/optimizer_step.py --flavor llama3_8b [--n-layers 8] [--json OUT.json]
    torchrun --nproc_per_node 2 benchmarks/optimizer_step.py --flavor llama3_8b --json OUT.json   (FSDP2 shards)

Builds the model on the meta device, shards it with titanmm's FSDP2 units when there is more than one rank (or with
--fsdp), otherwise keeps float32 parameters on the device (the one-GPU autocast layout), gives every parameter a
random gradient (or the gradient of one real backward: --backward-seq), and times (median of --iters after
--warmup; synchronized wall time, or CUDA events after a matmul load with --heat-ms) `clip_grad_norm_` (the norm)
and `clipped_step` (clipping and AdamW in torch's fused kernel) for each --implementations entry. Reports
the first step's seconds (state creation; compilation for "compiled"), milliseconds, the bytes AdamW must move
(4 float32 reads and 3 writes per parameter: 28 bytes) and the bandwidth that implies, beside a device-to-device
copy's. On 2 H200s (full 8B, 4.0 B parameters per GPU) the clipped fused
AdamW takes 43-47 ms alone, 62% of the copy bandwidth, and the whole optimizer phase 49.5 ms inside training (the
trainer's `optimizer_ms`); a profiled step shows ~79 ms: the profiler's overhead, not the kernel's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import results_io  # noqa: E402
from device_timing import copy_bandwidth, median_seconds  # noqa: E402
from titanmm.config.job_config import Optimizer  # noqa: E402
from titanmm.distributed import init_distributed  # noqa: E402
from titanmm.models.llama import LLAMA_FLAVORS, Transformer  # noqa: E402
from titanmm.optim import build_optimizer, clip_grad_norm_, clipped_step  # noqa: E402
from titanmm.parallel.fsdp import apply_fsdp  # noqa: E402

ADAMW_BYTES_PER_PARAM = 28  # read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq (float32)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def build(flavor: str, n_layers: int | None, device: torch.device, fsdp: bool) -> Transformer:
    args = LLAMA_FLAVORS[flavor]
    if n_layers is not None:
        args = dataclasses.replace(args, n_layers=n_layers)
    with torch.device("meta"):
        model = Transformer(args)
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        apply_fsdp(model, [model.layers], mesh, "bfloat16", "float32", lm=model)
    model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():  # values do not matter for the timing; random, so nothing is special-cased
            _local(p).normal_(0.0, 0.02)
    return model


def timed_seconds(step, device: torch.device, warmup: int, iters: int, heat_ms: float) -> float:
    """Median seconds of `step()`: synchronized wall time, or with `heat_ms` CUDA events around it after about
    that many milliseconds of matmuls queued right before (no idle gap between the load and the step)."""
    if not heat_ms or device.type != "cuda":
        return median_seconds(step, device, warmup, iters)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    matmul_ms = 1e3 * median_seconds(lambda: a @ a, device)
    times = []
    for i in range(warmup + iters):
        for _ in range(max(1, round(heat_ms / matmul_ms))):
            a @ a
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavor", default="llama3_8b", choices=sorted(LLAMA_FLAVORS))
    parser.add_argument("--n-layers", type=int, default=None, help="override the flavor's layer count")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 units even on one rank")
    parser.add_argument("--implementations", nargs="+", default=["fused", "compiled", "foreach"],
                        choices=["fused", "compiled", "foreach", "for-loop"])
    parser.add_argument("--backward-seq", type=int, default=0,
                        help="take the gradients from one real forward/backward of this many tokens (FSDP2's "
                             "reduce-scatter outputs, as in training) instead of random tensors")
    parser.add_argument("--heat-ms", type=float, default=0.0,
                        help="run bf16 matmuls for about this long right before each timed step (a GPU hot and "
                             "power-capped, as after a backward); the step is timed with CUDA events")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rank, world, device = init_distributed()
    fsdp = args.fsdp or world > 1
    model = build(args.flavor, args.n_layers, device, fsdp)
    params = [p for p in model.parameters() if p.requires_grad]
    if args.backward_seq:
        model.init_weights(buffer_device=device)
        tokens = torch.randint(0, model.args.vocab_size, (1, args.backward_seq + 1), device=device)
        with torch.autocast(device.type, torch.bfloat16, enabled=not fsdp):
            logits = model(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[0, 1:]).backward()
        del logits
    else:
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
    local_params = sum(_local(p).numel() for p in params)
    bandwidth = copy_bandwidth(device, gib=4.0 if device.type == "cuda" else 0.25)
    loss = torch.ones((), device=device)
    norm_ms = 1e3 * median_seconds(functools.partial(clip_grad_norm_, params, 0.0), device, args.warmup, args.iters)
    result = {"date": time.strftime("%Y-%m-%d"), "commit": results_io.commit(),
              "command": results_io.command_line("optimizer_step.py", argv),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else results_io.cpu_description(),
              "ranks": world, "fsdp": fsdp, "flavor": args.flavor, "n_layers": model.args.n_layers,
              "gradients": f"one backward of {args.backward_seq} tokens" if args.backward_seq else "random",
              "heat_ms": args.heat_ms, "params_per_rank": local_params,
              "adamw_bytes_per_rank": ADAMW_BYTES_PER_PARAM * local_params,
              "copy_bytes_per_s": bandwidth, "grad_norm_ms": norm_ms, "implementations": {}}
    for implementation in args.implementations:
        optimizer = build_optimizer([model], Optimizer(implementation=implementation))
        norm = clip_grad_norm_(params, 0.0)
        step = functools.partial(clipped_step, [optimizer], params, loss, norm, 1.0)
        first_s = median_seconds(step, device, warmup=0, iters=1)  # state creation (and compilation: "compiled")
        ms = 1e3 * timed_seconds(step, device, args.warmup, args.iters, args.heat_ms)
        bytes_per_s = ADAMW_BYTES_PER_PARAM * local_params / (ms / 1e3)
        result["implementations"][implementation] = {
            "first_step_s": first_s, "ms": ms, "bytes_per_s": bytes_per_s,
            "fraction_of_copy_bandwidth": bytes_per_s / bandwidth}
        del optimizer, step  # its state goes before the next one is made
    if rank == 0:
        print(json.dumps(result, indent=1), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
