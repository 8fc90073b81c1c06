"""The transformers peer of the LLaVA SFT side-by-side (benchmarks/compare.py, workload `llava_mistral_clip336_sft`):
`LlavaForConditionalGeneration` with SDPA attention under FSDP2, trained on the samples of
benchmarks/llava_sft_data.py (its hf_samples.npz: titanmm's own tokenization of the same samples).

    torchrun --nproc_per_node=4 benchmarks/hf_llava_sft.py --data DIR [--batch 2] [--steps 15] [--warmup 5]
        [--grad-ckpt] [--bf16-params] [--num-workers 2] [--tiny]

Model. The dimensions of `bench_hf.py llava` (../shared/peers/transformers): CLIP ViT-L/14 at 336 px (24 layers,
width 1024, quick-GELU, features of the second-to-last layer without the class token: 576 per image), LLaVA's
projector (`LlavaMultiModalProjector`, 1024 -> 4096 -> 4096, GELU) and Mistral 7B (32 layers, width 4096, MLP
14336, 32 query / 8 key-value heads, RoPE theta 1e6, vocabulary 32768, untied output), image token id 32000;
random weights (seeded, the same on every rank). `--tiny` keeps the image geometry (336 px, 576 tokens per image)
but makes both towers 2 layers wide 32 / 64 and the vocabulary 2304 (the shipped tokenizer's 2048 ids, the image
token last), for CPU tests.

Training. The vision tower is frozen; the projector and the language model train (LLaVA's stage 2). FSDP2 as
the PyTorch FSDP2 recipes do it, over all ranks: `fully_shard` on every vision and language-model layer, then on
the whole model (not on the towers' own modules: transformers looks up a tower's output recorders by its class,
which fully_shard changes), with `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` over fp32
parameters (`--bf16-params`: parameters, gradients, reduction and AdamW states all in bf16, as bench_hf.py's
pure-bf16 step). AdamW (fused; lr 1e-6, betas 0.9 / 0.95, weight decay 0.1: the SFT
recipe of train_configs/llava_mistral_clip_sft.toml), gradient clipping at 0.5 over the trained parameters.
`--grad-ckpt`: transformers' own activation checkpointing on the language model's layers (non-reentrant).

Data, as transformers users batch it: each rank takes `--batch` consecutive samples per step (the file's order,
the step's samples split over the ranks in rank order, wrapping around), padded on the right to the longest of
them, with an attention mask; no packing. `input_ids` are titanmm's ids of the sample with the image tokens mapped
to 32000, one token longer than titanmm's input (transformers shifts the labels inside the model: the trained
targets are exactly titanmm's). Images: titanmm's CLIP-336 preprocessing (`titanmm.data.images`: shortest side
to 336, bicubic, centre crop, CLIP mean / std), so the pixels are the ones titanmm trains on, prepared in
`--num-workers` DataLoader workers per rank (pinned, copied without blocking).

Measurement: `--warmup` steps, then the GPUs are synchronised and the remaining `--steps - --warmup` steps timed
as one window (this script adds no host sync inside it; the loss is read at the end). Prints a human line and one
parseable line

    HF LLaVA SFT result: {"samples_per_s_per_gpu": ..., "tokens_per_s_per_gpu": ..., ...}

with samples/s/GPU, non-pad tokens/s/GPU (tokens under the attention mask), padded tokens/s/GPU, ms/step and the
peak allocated / reserved GiB of the timed steps (the largest over the ranks; their batches differ in length).
Runs on CPU too (gloo, fp32 compute unless --cpu-bf16), one process without torchrun.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

RESULT_PREFIX = "HF LLaVA SFT result:"
HF_IMAGE_TOKEN_ID = 32000
TINY_VOCAB = 2304  # --tiny: the shipped tokenizer's 2048 ids and the image token (the last id); small logits on CPU
PAD_ID = 0
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------

def llava_config(tiny: bool = False):
    """transformers' LlavaConfig of bench_hf.py's LLaVA (CLIP-L/336 + Mistral 7B), or its tiny form."""
    import transformers as tf

    if tiny:
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=32)
        text = tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=32768,
                                rope_theta=1e6)
    else:
        vision = tf.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu",
                                     projection_dim=768)
        text = tf.MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=8, vocab_size=32768, max_position_embeddings=32768,
                                rope_theta=1e6)
    config = tf.LlavaConfig(vision_config=vision, text_config=text,
                            image_token_id=TINY_VOCAB - 1 if tiny else HF_IMAGE_TOKEN_ID,
                            vision_feature_layer=-2, vision_feature_select_strategy="default",
                            projector_hidden_act="gelu")
    config._attn_implementation = "sdpa"
    return config


def image_tokens_of(config) -> int:
    """Image features per image: (image size / patch size)^2 (the class token dropped, strategy "default")."""
    v = config.vision_config
    return (v.image_size // v.patch_size) ** 2


def _layer_lists(module: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The `layers` ModuleLists under `module` (the transformer blocks), outermost first."""
    return [m for name, m in module.named_modules() if name.endswith("layers") and isinstance(m, torch.nn.ModuleList)]


def enable_activation_checkpointing(language_model) -> None:
    """transformers' own (non-reentrant) activation checkpointing on every layer of the language model."""
    if hasattr(language_model, "activation_checkpointing_enable"):  # newer transformers
        language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_model(config, device: torch.device, mesh, bf16_params: bool, grad_ckpt: bool, compute_dtype: torch.dtype):
    """The model on `device`, vision tower frozen, sharded with FSDP2 over `mesh`; returns (model, trained params)."""
    import transformers as tf
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if bf16_params else torch.float32)
    try:
        with torch.device(device):
            model = tf.LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.model.vision_tower.requires_grad_(False)
    if grad_ckpt:
        enable_activation_checkpointing(model.model.language_model)
    model.train()
    if bf16_params or compute_dtype == torch.float32:
        policy = MixedPrecisionPolicy()  # compute in the parameters' dtype
    else:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # Layers, then the root (which keeps the embeddings, the vision tower's embeddings and norms, the projector,
    # the final norm and the output layer). Not the towers themselves: fully_shard changes a module's class, and
    # transformers finds a tower's hidden-state recorders by its class (the vision features would be lost).
    for tower in (model.model.vision_tower, model.model.language_model):
        for layer in _layer_lists(tower)[0]:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    trained = [p for p in model.parameters() if p.requires_grad]
    return model, trained


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

class SFTSamples(torch.utils.data.Dataset):
    """The samples of hf_samples.npz: (ids with the image tokens mapped to `image_token_id`, labels, pixels)."""

    def __init__(self, data_dir: Path, image_token_id: int = HF_IMAGE_TOKEN_ID):
        from llava_sft_data import PEER_FILE, load_peer_file

        self.root = Path(data_dir)
        loaded = load_peer_file(self.root / PEER_FILE)
        self.samples = loaded["samples"]
        self.source_image_token_id, self.image_token_id = loaded["image_token_id"], image_token_id
        self.tokens_per_image = loaded["tokens_per_image"]

    def __len__(self) -> int:
        return len(self.samples)

    def max_text_id(self) -> int:
        """The largest id of the samples other than the image token."""
        return max(int(ids[ids != self.source_image_token_id].max(initial=0)) for ids, _, _ in self.samples)

    def pixels(self, relative_path: str) -> torch.Tensor:
        """[3, 336, 336] float32: titanmm's CLIP-336 preprocessing of the image file."""
        from titanmm.data.images import ImageConfig, load_image, preprocess_single

        return preprocess_single(load_image((self.root / relative_path).read_bytes()), ImageConfig.clip_336())

    def __getitem__(self, index: int) -> dict:
        ids, targets, images = self.samples[index]
        ids = torch.from_numpy(ids.astype("int64"))
        ids[ids == self.source_image_token_id] = self.image_token_id
        labels = torch.where(torch.from_numpy(targets), ids, IGNORE_INDEX)
        pixels = torch.stack([self.pixels(p) for p in images]) if images else torch.zeros(0, 3, 336, 336)
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels}


def pad_collate(samples: list[dict]) -> dict:
    """Right-pad to the longest sample: input_ids (PAD_ID), labels (-100), attention_mask; all images stacked;
    num_tokens / padded_tokens as Python ints (counted on the host, no GPU sync)."""
    longest = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), longest), PAD_ID, dtype=torch.long)
    labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = s["input_ids"], s["labels"], 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "num_samples": len(samples), "num_tokens": int(attention_mask.sum()), "padded_tokens": input_ids.numel()}


def rank_indices(num_samples: int, steps: int, batch: int, rank: int, world: int) -> list[int]:
    """The sample indices of `rank` for `steps` steps: step s takes samples [s * world * batch, (s + 1) * world *
    batch) of the file (modulo its length), rank r the r-th `batch` of them."""
    return [((step * world + rank) * batch + i) % num_samples for step in range(steps) for i in range(batch)]


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device): torchrun's environment, or a one-process group; NCCL on GPUs, gloo on CPU."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a folder written by benchmarks/llava_sft_data.py")
    p.add_argument("--batch", type=int, default=2, help="samples per rank and step, padded to the longest")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing on the language model layers")
    p.add_argument("--bf16-params", action="store_true", help="bf16 parameters, gradients and optimizer states")
    p.add_argument("--cpu-bf16", action="store_true", help="on CPU, compute in bf16 too (default fp32 there)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--max-norm", type=float, default=0.5)
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="2-layer towers and a 2304-id vocabulary (CPU tests)")
    args = p.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup {args.warmup} must leave at least one of the --steps {args.steps} steps")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    try:
        return run(args, rank, world, device)
    finally:
        # The sharded model is cyclic garbage now: collect it while the interpreter is whole (a process group it
        # keeps alive, destroyed during interpreter shutdown, can abort the process).
        gc.collect()
        dist.destroy_process_group()


def run(args, rank: int, world: int, device: torch.device) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(args.seed)
    config = llava_config(args.tiny)
    dataset = SFTSamples(args.data, config.image_token_id)
    if dataset.tokens_per_image != image_tokens_of(config):
        raise ValueError(f"the data has {dataset.tokens_per_image} image tokens per image, the model makes "
                         f"{image_tokens_of(config)}")
    if dataset.max_text_id() >= config.text_config.vocab_size:
        raise ValueError(f"the data has token id {dataset.max_text_id()}, the vocabulary "
                         f"{config.text_config.vocab_size} ids")
    compute_dtype = torch.bfloat16 if device.type == "cuda" or args.cpu_bf16 or args.bf16_params else torch.float32
    mesh = init_device_mesh(device.type, (world,))
    model, trained = build_model(config, device, mesh, args.bf16_params, args.grad_ckpt, compute_dtype)
    optimizer = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=device.type == "cuda" or None)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the unsharded weights of the construction

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, sampler=rank_indices(len(dataset), args.steps, args.batch, rank, world),
        collate_fn=pad_collate, num_workers=args.num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.num_workers else None, persistent_workers=False)
    counts = torch.zeros(3, dtype=torch.float64)  # samples, non-pad tokens, padded tokens of the timed steps
    loss = None
    started = None
    for step, batch in enumerate(loader):
        if step == args.warmup:
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
        if step >= args.warmup:
            counts += torch.tensor([batch["num_samples"], batch["num_tokens"], batch["padded_tokens"]],
                                   dtype=torch.float64)
        batch = _to(batch, device)
        pixels = batch["pixel_values"] if batch["pixel_values"].shape[0] else None
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=pixels,
                    labels=batch["labels"], use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, args.max_norm, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = out.loss.detach()
    _sync(device)
    seconds = time.perf_counter() - started
    timed_steps = args.steps - args.warmup
    counts = counts.to(device)  # NCCL reduces device tensors only
    dist.all_reduce(counts)
    counts = counts.cpu()
    loss = loss.float()
    dist.all_reduce(loss)
    memory = torch.zeros(2, dtype=torch.float64)
    if device.type == "cuda":
        memory = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)],
                              dtype=torch.float64, device=device)
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        memory = memory.cpu()
    samples, tokens, padded = counts.tolist()
    result = {
        "gpus": world, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "timed_steps": timed_steps,
        "seconds": seconds, "ms_per_step": 1000 * seconds / timed_steps,
        "samples_per_s_per_gpu": samples / seconds / world,
        "tokens_per_s_per_gpu": tokens / seconds / world,
        "padded_tokens_per_s_per_gpu": padded / seconds / world,
        "padding_efficiency": tokens / padded if padded else None,
        "samples": int(samples), "tokens": int(tokens), "padded_tokens": int(padded),
        "peak_allocated_gib": memory[0].item() / 2**30 if device.type == "cuda" else None,
        "peak_reserved_gib": memory[1].item() / 2**30 if device.type == "cuda" else None,
        "loss": loss.item() / world,
        "grad_ckpt": args.grad_ckpt, "params": "bf16" if args.bf16_params else "fp32",
        "compute": str(compute_dtype).removeprefix("torch."), "tiny": args.tiny,
        "num_params": sum(p.numel() for p in model.parameters()), "trained_params": sum(p.numel() for p in trained),
    }
    if not math.isfinite(result["loss"]):
        raise FloatingPointError(f"non-finite loss {result['loss']}")
    if rank == 0:
        mem = "" if result["peak_reserved_gib"] is None else \
            f", peak {result['peak_allocated_gib']:.1f} GiB allocated / {result['peak_reserved_gib']:.1f} reserved"
        print(f"HF LLaVA SFT B={args.batch} x {world} GPU(s), {timed_steps} timed steps: "
              f"{result['ms_per_step']:.1f} ms/step, {result['samples_per_s_per_gpu']:.2f} samples/s/GPU, "
              f"{result['tokens_per_s_per_gpu']:,.0f} tok/s/GPU ({result['padded_tokens_per_s_per_gpu']:,.0f} padded)"
              f"{mem}, loss {result['loss']:.4f}", flush=True)
        print(RESULT_PREFIX + " " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
