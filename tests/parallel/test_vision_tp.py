"""The VLM under TP 2, FSDP 2 and HSDP (2 x 1) equals the single-process model (CPU, gloo, float32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from titanmm.models import MODEL_SPECS
from titanmm.models.llama.flavors import LLAMA_FLAVORS
from tests.utils import free_port, gloo_process_group

TOL = 1e-5
STEPS = 3
SEQ = 64
BATCH = 4


def _model_args(name: str):
    flavors = MODEL_SPECS["vlm"].flavors
    if name == "clip":
        return flavors["debug_vlm"]
    if name == "internvit_qwen2":  # qk-norm tower, pixel shuffle, LN projector, tied LM with qkv bias
        args = flavors["debug_vlm_internvit"]
        lm = dataclasses.replace(LLAMA_FLAVORS["debug_qwen2"])
        return dataclasses.replace(args, projector=dataclasses.replace(args.projector, output_dim=lm.dim), lm=lm)
    raise ValueError(name)


def _batch(model, seed: int = 0):
    """input_ids [4, 64] and the tiles: sample 0 has 2 images, 1 has 1, 2 and 3 none."""
    args = model.args
    size = args.image.tile_size
    n = model.tokens_per_tile(size, size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, args.image_token_id - 1, (BATCH, SEQ), generator=g)
    tiles_per_sample = [2, 1, 0, 0]
    for b, count in enumerate(tiles_per_sample):
        for k in range(count):
            start = 2 + k * (n + 3)
            ids[b, start:start + n] = args.image_token_id
    pixels = torch.randn(sum(tiles_per_sample), 3, size, size, generator=g)
    return ids, pixels, tiles_per_sample


def _loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _reference(name: str):
    from titanmm.models.vlm import VisionLanguageModel

    torch.manual_seed(0)
    model = VisionLanguageModel(_model_args(name))
    model.init_weights(seed=3)
    ids, pixels, _ = _batch(model)
    with torch.no_grad():
        logits = model(ids, pixels)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(STEPS):
        loss = _loss(model(ids, pixels), ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return logits, losses


def _config(ac_mode: str):
    """The job config's defaults (so that new options reach this test), with these settings."""
    from titanmm.config.job_config import JobConfig

    config = JobConfig()
    config.parallelism.enable_loss_parallel = False
    config.activation_checkpoint.mode, config.activation_checkpoint.memory_budget = ac_mode, 1.0
    config.compile.enable = False
    config.training.mixed_precision_param = config.training.mixed_precision_reduce = "float32"
    return config


def _worker(rank: int, world: int, port: int, layout: str, names: list[str]) -> None:
    with gloo_process_group(rank, world, port):
        from titanmm.parallel.parallel_dims import ParallelDims
        from titanmm.parallel.parallelize_vlm import parallelize_vlm
        from titanmm.models.vlm import VisionLanguageModel

        degrees = {"tp2": dict(dp_replicate=1, dp_shard=1, tp=2), "fsdp2": dict(dp_replicate=1, dp_shard=2, tp=1),
                   "hsdp2x1": dict(dp_replicate=2, dp_shard=1, tp=1)}[layout]
        dims = ParallelDims(pp=1, cp=1, world_size=world, **degrees)
        dims.build_mesh("cpu")
        for name in names:
            ref_logits, ref_losses = _reference(name)
            with torch.device("meta"):
                model = VisionLanguageModel(_model_args(name))
            parallelize_vlm(model, dims, _config("full" if layout == "fsdp2" else "none"), "cpu")
            model.to_empty(device="cpu")
            model.init_weights(seed=3, buffer_device=torch.device("cpu"))
            ids, pixels, tiles = _batch(model)
            if dims.dp > 1:  # each data-parallel rank takes half of the batch (rank 1: no images at all)
                half = BATCH // 2
                first_tile = sum(tiles[:rank * half])
                n_tiles = sum(tiles[rank * half:(rank + 1) * half])
                ids, ref_logits = ids[rank * half:(rank + 1) * half], ref_logits[rank * half:(rank + 1) * half]
                pixels = pixels[first_tile:first_tile + n_tiles]  # may be empty: the tower still runs
            with torch.no_grad():
                logits = model(ids, pixels)
            if dims.dp > 1:
                # FSDP2 keeps units with reshard_after_forward=False unsharded after a forward without
                # backward; reshard them, or the next step trains on stale parameters.
                for module in model.modules():
                    if hasattr(module, "reshard") and hasattr(module, "unshard"):
                        module.reshard()
            err = ((logits - ref_logits).norm() / ref_logits.norm()).item()
            assert err <= TOL, (layout, name, "logits", err)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            for step in range(STEPS):
                loss = _loss(model(ids, pixels), ids)
                loss.backward()
                opt.step()
                opt.zero_grad()
                total = loss.detach().clone()
                if dims.dp > 1:  # the global loss is the mean of the ranks' equal-sized halves
                    dist.all_reduce(total)
                    total /= dims.dp
                assert abs(total.item() - ref_losses[step]) <= TOL * abs(ref_losses[step]), \
                    (layout, name, step, total.item(), ref_losses[step])
            assert ref_losses[-1] < ref_losses[0]


@pytest.mark.parametrize("layout", ["tp2", "fsdp2", "hsdp2x1"])
def test_vlm_layout_matches_single_process(layout):
    names = ["clip"] + (["internvit_qwen2"] if "internvit" in MODEL_SPECS else [])
    mp.spawn(_worker, args=(2, free_port(), layout, names), nprocs=2, join=True)
