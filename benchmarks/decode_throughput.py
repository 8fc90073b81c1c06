"""Greedy decoding throughput of `titanmm.generate` and the memory-bandwidth bound of batch 1.

    python benchmarks/decode_throughput.py --flavor llama3_8b --batch 1 32 --prompt-len 128 --new-tokens 128 \
        [--warmup 2] [--iters 3] [--json OUT.json]
    python benchmarks/decode_throughput.py --model vlm --flavor llava_mistral_7b_clip336 --batch 1 32 ...

The model has random weights, built the way `titanmm.load` builds a checkpoint's (fp32 initialisation on the
device, then cast to --dtype). Each batch gets random prompts of --prompt-len tokens; every generate call runs
greedy decoding to --new-tokens new tokens (no EOS), prefill included. After --warmup untimed calls, the median
of --iters timed calls gives new tokens/s = batch x new tokens / seconds per call.

VLM mode (`--model vlm`, a `titanmm.models` "vlm" flavor): each prompt is one image, bos + the image's placeholder
tokens (`image_token_id` x `model.tokens_per_tile(tile, tile)`, 576 for CLIP-L/336) + --prompt-len random text
tokens, with random pixels [batch, 3, tile, tile] (one tile per row, in row order); the vision tower and projector
run in the prefill only. The JSON then also has `model` "vlm", `image_tokens` and `prompt_tokens` (the whole
prompt's length).

Bandwidth bound: a device-to-device copy of a 4 GiB buffer (median of 10) measures the memory bandwidth (bytes
read + written per second). Every decode step reads each weight once (the input embedding only by row), so one
sequence cannot decode faster than bandwidth / weight bytes tokens/s; the fraction of that bound batch 1 reaches
is printed and written (the KV cache reads, small at these lengths, are not counted). For a VLM the weights read
per step are its language model's (the vision tower and projector run in the prefill only).

Roofline of a whole call, every batch (`call_roofline`): the prefill's matmul FLOPs at the measured bf16 matmul
rate (an 8192^3 matmul) plus the decode steps' weight and KV-cache bytes at the copy bandwidth; the JSON has
`roofline_tokens_per_s` and the fraction reached. At batch 32 with long prompts (LLaVA's 705 tokens) the prefill is
compute-bound and the cache reads add a fifth to every step's bytes, so the call cannot approach batch 32 x the
batch-1 bound.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import results_io  # noqa: E402
from device_timing import copy_bandwidth, matmul_throughput, synchronize  # noqa: E402
from titanmm.generate import generate  # noqa: E402
from titanmm.models import MODEL_SPECS  # noqa: E402
from titanmm.models.llama import Transformer  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def call_roofline(model, batch: int, prompt_tokens: int, new_tokens: int, bandwidth: float,
                  matmul_flops_per_s: float) -> dict:
    """The fastest a generate call of `batch` prompts could be on this device: its prefill at the matmul ceiling
    (2 x parameters x tokens for the language model's matmuls, the output layer on the last position only, causal
    attention's two matmuls, and for a VLM the vision tower and projector on each image's patches) plus its
    new_tokens - 1 decode steps at the copy bandwidth (every weight read once per step, as for batch 1, plus each
    row's keys and values cached so far). Gives `roofline_tokens_per_s` = batch x new_tokens / that time."""
    lm = language_model(model)
    a = lm.args
    output = lm.output.weight.numel() if lm.output is not None else 0
    embedding = lm.tok_embeddings.weight.numel()
    body = sum(p.numel() for p in lm.parameters()) - embedding - output
    flops = 2 * body * batch * prompt_tokens + 2 * output * batch
    flops += a.n_layers * 2 * batch * a.n_heads * a.head_dim * prompt_tokens**2  # QK^T and PV, causal halves
    if lm is not model:  # the vision tower and projector, one tile per prompt
        vision = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in lm.parameters())
        flops += 2 * vision * batch * image_tokens(model)
    element = next(lm.parameters()).element_size()
    kv_per_token = a.n_layers * 2 * a.n_kv_heads * a.head_dim * element
    _, weight_bytes = weights_read(model)
    steps = max(new_tokens - 1, 0)
    decode_bytes = steps * weight_bytes + kv_per_token * batch * sum(prompt_tokens + j for j in range(1, steps + 1))
    seconds = flops / matmul_flops_per_s + decode_bytes / bandwidth
    return {"roofline_seconds_per_call": seconds, "roofline_prefill_flops": flops,
            "roofline_decode_bytes": decode_bytes, "roofline_tokens_per_s": batch * new_tokens / seconds}


def build_model(flavor: str, dtype: torch.dtype, device: torch.device, kind: str = "llama"):
    """A random-weight model of `flavor` (of the `kind` family: "llama" or "vlm"), as titanmm.load builds one:
    fp32 init on the device, then cast."""
    spec = MODEL_SPECS[kind]
    with torch.device("meta"):
        model = spec.model_cls(spec.flavors[flavor])
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    return model.to(dtype=dtype).eval()


def language_model(model) -> Transformer:
    """The language model of a VLM (the model itself for an LM)."""
    return model.lm if hasattr(model, "encode_images") else model


def weights_read(model) -> tuple[int, int]:
    """(parameters, bytes) of the weights one decode step reads: all of the language model's but the input
    embedding table (a VLM's vision tower and projector run in the prefill only)."""
    lm = language_model(model)
    embedding = lm.tok_embeddings.weight
    read = [p for p in lm.parameters() if p is not embedding]
    return sum(p.numel() for p in read), sum(p.numel() * p.element_size() for p in read)


def image_tokens(model) -> int:
    """Placeholder tokens of one image (one tile of the flavor's tile size); 0 for a language model."""
    if not hasattr(model, "encode_images"):
        return 0
    size = model.args.image.tile_size
    return model.tokens_per_tile(size, size)


def make_inputs(model, batch: int, prompt_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompts [batch, tokens], pixel_values [batch, 3, tile, tile] or None) of one batch, seeded by the batch.

    LM: `prompt_len` random tokens per row. VLM: bos + one image's placeholder tokens + `prompt_len` random text
    tokens (never the placeholder id) per row, and one random tile per row."""
    generator = torch.Generator().manual_seed(batch)
    lm = language_model(model)
    prompts = torch.randint(0, lm.args.vocab_size - 1, (batch, prompt_len), generator=generator)
    if lm is model:
        return prompts, None
    image_token = model.args.image_token_id
    prompts = torch.where(prompts == image_token, (image_token + 1) % lm.args.vocab_size, prompts)
    bos = lm.args.bos_token_id if getattr(lm.args, "bos_token_id", None) is not None else 1
    size = model.args.image.tile_size
    prompts = torch.cat([torch.full((batch, 1), bos, dtype=torch.long),
                         torch.full((batch, image_tokens(model)), image_token, dtype=torch.long), prompts], dim=1)
    pixel_values = torch.randn(batch, 3, size, size, generator=generator)
    weight = next(model.vision.parameters())
    return prompts, pixel_values.to(device=device, dtype=weight.dtype)


def time_batch(model, batch: int, prompt_len: int, new_tokens: int, warmup: int, iters: int,
               device: torch.device, compile: bool = False, compile_prefill: bool = True) -> dict:
    prompts, pixel_values = make_inputs(model, batch, prompt_len, device)
    for _ in range(warmup):
        generate(model, prompts, pixel_values=pixel_values, max_new_tokens=new_tokens, compile=compile,
                 compile_prefill=compile_prefill)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        out = generate(model, prompts, pixel_values=pixel_values, max_new_tokens=new_tokens, compile=compile,
                       compile_prefill=compile_prefill)
        synchronize(device)
        times.append(time.perf_counter() - start)
        if any(len(ids) != new_tokens for ids in out.token_ids):
            raise RuntimeError(f"a row stopped before {new_tokens} new tokens")
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"new_tokens_per_s": batch * new_tokens / seconds, "seconds_per_call": seconds,
            "seconds_all_calls": times, "peak_mem_gib": peak}


def profile_call(model, batch: int, prompt_len: int, new_tokens: int, folder: Path,
                 compile: bool = False, compile_prefill: bool = True) -> Path:
    """One more generate call (after the timed ones) under torch.profiler: writes the kernel time breakdown
    (`titanmm.utils.profiling.profile_breakdown`) and a Chrome trace to `folder`; returns the breakdown's path."""
    from titanmm.utils.profiling import profile_breakdown

    prompts, pixel_values = make_inputs(model, batch, prompt_len, device=next(model.parameters()).device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function(f"ProfilerStep#decode_B{batch}"):
            generate(model, prompts, pixel_values=pixel_values, max_new_tokens=new_tokens, compile=compile,
                     compile_prefill=compile_prefill)
    folder.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(folder / f"decode_B{batch}_trace.json"))
    out = folder / f"decode_B{batch}_kernels.txt"
    out.write_text(profile_breakdown(prof, f"generate, batch {batch}, {prompts.shape[1]} + {new_tokens} tokens")
                   + "\n")
    return out


def _without_fused(module_name: str):
    """Keep generate's fused projections off in one kind of module (`attention` or `feed_forward`); ablations
    applied one after the other wrap each other, so `--without fused_qkv fused_w13` turns both off."""
    def apply():
        fused_projections = Transformer.fused_projections  # as patched by the ablations applied before

        @contextlib.contextmanager
        def without(self):
            with fused_projections(self):
                for layer in self.layers.values():
                    getattr(layer, module_name).use_fused_projections = False
                yield

        Transformer.fused_projections = without
    return apply


ABLATIONS = {"fused_qkv": _without_fused("attention"), "fused_w13": _without_fused("feed_forward")}
"""--without NAME: fused_qkv = q, k and v in three matmuls; fused_w13 = w1 and w3 in two."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["llama", "vlm"], default="llama",
                        help="llama: a language model; vlm: a vision-language model, one image per prompt")
    parser.add_argument("--flavor", default=None,
                        help="a flavor of --model (default: llama3_8b; for vlm llava_mistral_7b_clip336)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt-len", type=int, default=128,
                        help="prompt tokens (VLM: the random text tokens after bos and the image's placeholders)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="untimed generate calls per batch")
    parser.add_argument("--iters", type=int, default=3, help="timed generate calls per batch (median)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="compiled decode step (CUDA graphs on GPU; titanmm.generate compile=True)")
    parser.add_argument("--eager-prefill", dest="compile_prefill", action="store_false",
                        help="with --compile: keep the prefill eager (titanmm.generate compile_prefill=False)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="profile one more call per batch: kernel breakdown and Chrome trace into DIR")
    parser.add_argument("--without", nargs="+", default=[], choices=sorted(ABLATIONS),
                        help="ablations: turn these decoding optimisations off (measures what each brings)")
    args = parser.parse_args(argv)
    for name in args.without:
        ABLATIONS[name]()
    flavors = MODEL_SPECS[args.model].flavors
    if args.flavor is None:
        args.flavor = "llama3_8b" if args.model == "llama" else "llava_mistral_7b_clip336"
    if args.flavor not in flavors:
        parser.error(f"--flavor {args.flavor!r} is not a {args.model} flavor; known: {sorted(flavors)}")

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    bandwidth = copy_bandwidth(device, gib=4.0 if device.type == "cuda" else 0.25)
    matmul_flops = matmul_throughput(device, DTYPES[args.dtype])
    model = build_model(args.flavor, DTYPES[args.dtype], device, args.model)
    n_image = image_tokens(model)
    prompt_tokens = args.prompt_len + (1 + n_image if n_image else 0)
    params, nbytes = weights_read(model)
    bound = bandwidth / nbytes
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}: copy bandwidth {bandwidth / 1e9:,.0f} GB/s; {args.flavor} {args.dtype} weights read per step "
          f"{nbytes / 1e9:.2f} GB -> batch-1 bound {bound:,.1f} tok/s", flush=True)
    if n_image:
        print(f"prompts: bos + {n_image} image tokens + {args.prompt_len} text tokens = {prompt_tokens} tokens, "
              f"one image per prompt", flush=True)
    batches = {}
    for batch in args.batch:
        r = time_batch(model, batch, args.prompt_len, args.new_tokens, args.warmup, args.iters, device, args.compile,
                       args.compile_prefill)
        if batch == 1:
            r["bandwidth_bound_fraction"] = r["new_tokens_per_s"] / bound
        r.update(call_roofline(model, batch, prompt_tokens, args.new_tokens, bandwidth, matmul_flops))
        r["roofline_fraction"] = r["new_tokens_per_s"] / r["roofline_tokens_per_s"]
        batches[str(batch)] = r
        if args.profile:
            r["profile"] = str(profile_call(model, batch, args.prompt_len, args.new_tokens, Path(args.profile),
                                            args.compile, args.compile_prefill))
        bound_note = f", {100 * r['bandwidth_bound_fraction']:.1f}% of the bandwidth bound" if batch == 1 else ""
        peak = "n/a" if r["peak_mem_gib"] is None else f"{r['peak_mem_gib']:.1f} GiB"
        print(f"titanmm generate {args.flavor} B={batch}: {r['new_tokens_per_s']:,.1f} new tok/s "
              f"({r['seconds_per_call']:.2f} s per call of {args.new_tokens} tokens){bound_note}, "
              f"{100 * r['roofline_fraction']:.1f}% of the call's roofline ({r['roofline_tokens_per_s']:,.0f}), "
              f"peak {peak}",
              flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "commit": results_io.commit(),
              "command": results_io.command_line("decode_throughput.py", argv), "device": name,
              "model": args.model, "flavor": args.flavor, "dtype": args.dtype, "compile": args.compile,
              "compile_prefill": args.compile_prefill, "prompt_len": args.prompt_len, "image_tokens": n_image,
              "prompt_tokens": prompt_tokens, "new_tokens": args.new_tokens, "warmup": args.warmup,
              "iters": args.iters, "hbm_copy_bytes_per_s": bandwidth, "matmul_flops_per_s": matmul_flops,
              "params_read": params, "weight_bytes": nbytes, "bandwidth_bound_tokens_per_s": bound,
              "batches": batches}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
