"""Peer baseline: greedy decoding throughput of transformers' LlavaForConditionalGeneration.generate (random weights).

    python benchmarks/hf_llava_decode.py --batch B [--mode default|static] [--prompt-len 128] [--new-tokens 128] \
        [--warmup 2] [--iters 3] [--tiny] [--device cuda|cpu]

The model has the dimensions of ../shared/peers/transformers/bench_hf.py's LLaVA (CLIP-L/336 vision tower, features
of the second-to-last layer without the class token, Mistral-7B text model with vocab 32768, image_token_id 32000,
gelu projector), in bf16 with SDPA attention, initialised at random directly on the device. `--tiny` shrinks every
width and depth (for tests on the CPU; vocab and image_token_id stay).

Each of the B prompts is one image: bos + the image's placeholder tokens (as many as the model expects:
(image_size / patch_size)^2 = 576, the class token dropped) + --prompt-len random text tokens, with random pixels
[B, 3, 336, 336] and an all-ones attention mask. Every call is
`generate(input_ids, pixel_values, attention_mask, max_new_tokens=N, min_new_tokens=N, do_sample=False,
eos_token_id=None, pad_token_id=0)`, prefill included; mode `default` keeps transformers' default (dynamic) cache,
`static` sets `cache_implementation="static"` (transformers then compiles the decoding forward itself on CUDA).
After --warmup calls, the mean of --iters timed calls gives new tokens/s = B x N / seconds per call, printed as

    HF generate llava-mistral-7B default B=32: 1,234 new tok/s (3.32 s per call of 128 tokens), peak 20.1 GiB

(the line benchmarks/compare.py's `parse_hf_decode` reads; peak = peak allocated memory on CUDA, n/a elsewhere).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

MODEL_NAME = "llava-mistral-7B"
IMAGE_TOKEN_ID, BOS_ID, VOCAB = 32000, 1, 32768


def build_config(tiny: bool = False):
    """The LlavaConfig of bench_hf.py's LLaVA (CLIP-L/336 + Mistral 7B), or a tiny one of the same structure."""
    import transformers as tf

    if tiny:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=56, patch_size=14, projection_dim=32)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    else:
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=336, patch_size=14, projection_dim=768)
        text = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8)
    vc = tf.CLIPVisionConfig(hidden_act="quick_gelu", **vision)
    lc = tf.MistralConfig(vocab_size=VOCAB, max_position_embeddings=4096, rope_theta=1e6, **text)
    cfg = tf.LlavaConfig(vision_config=vc, text_config=lc, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = "sdpa"
    return cfg


def image_tokens(cfg) -> int:
    """Placeholder tokens of one image: one per patch ("default" feature selection drops the class token)."""
    vc = cfg.vision_config
    patches = (vc.image_size // vc.patch_size) ** 2
    return patches if cfg.vision_feature_select_strategy == "default" else patches + 1


def build_model(cfg, device: torch.device, dtype: torch.dtype = torch.bfloat16):
    import transformers as tf

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = tf.LlavaForConditionalGeneration(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_inputs(cfg, batch: int, prompt_len: int, device: torch.device, dtype: torch.dtype):
    """(input_ids, attention_mask, pixel_values) of `batch` one-image prompts: bos + image tokens + text."""
    generator = torch.Generator().manual_seed(batch)
    text = torch.randint(0, IMAGE_TOKEN_ID, (batch, prompt_len), generator=generator)  # never the image token
    ids = torch.cat([torch.full((batch, 1), BOS_ID), torch.full((batch, image_tokens(cfg)), IMAGE_TOKEN_ID), text],
                    dim=1)
    size = cfg.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    return ids.to(device), torch.ones_like(ids).to(device), pixels.to(device=device, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def result_line(mode: str, batch: int, rate: float, seconds: float, new_tokens: int, peak_gib: float | None) -> str:
    peak = "n/a" if peak_gib is None else f"{peak_gib:.1f} GiB"
    return (f"HF generate {MODEL_NAME} {mode} B={batch}: {rate:,.1f} new tok/s ({seconds:.2f} s per call of "
            f"{new_tokens} tokens), peak {peak}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--mode", choices=["default", "static"], default="default")
    parser.add_argument("--prompt-len", type=int, default=128, help="random text tokens after bos and the image")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny widths and depths (tests, CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16
    cfg = build_config(args.tiny)
    model = build_model(cfg, device, dtype)
    ids, mask, pixels = make_inputs(cfg, args.batch, args.prompt_len, device, dtype)
    new = args.new_tokens
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    if args.mode == "static":
        model.generation_config.cache_implementation = "static"
    print(f"{MODEL_NAME}{' (tiny)' if args.tiny else ''} on {device}: prompts of bos + {image_tokens(cfg)} image "
          f"tokens + {args.prompt_len} text tokens = {ids.shape[1]} tokens, batch {args.batch}, {args.mode} cache",
          flush=True)

    def call():
        out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, **kwargs)
        if out.shape[1] - ids.shape[1] != new:
            raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, not {new}")

    with torch.no_grad():
        for _ in range(args.warmup):
            call()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(args.iters):
            call()
        synchronize(device)
        seconds = (time.perf_counter() - start) / args.iters
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    print(result_line(args.mode, args.batch, args.batch * new / seconds, seconds, new, peak), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
