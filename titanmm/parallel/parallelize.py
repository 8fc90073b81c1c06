"""Apply parallelism to a plain model, always in the same order: TP -> CP -> AC -> compile -> FSDP.

1. Tensor parallel (DTensor plans) rewrites the parameters of each block into TP shards. Context
   parallel then hooks each block's attention kernel to run ring attention (titanmm.parallel.context_parallel).
2. Activation checkpointing wraps each block.
3. torch.compile compiles each (wrapped) block.
4. FSDP2 shards the token embedding, each block, the final norm + output layer, then the root, over the
   data-parallel mesh (HSDP when the run has replicas), with bf16 parameters and fp32 gradient reduction.
   A run on one GPU without parallelism skips it and computes under torch.autocast instead (`uses_autocast`).
The model (or one pipeline stage of it, see titanmm.parallel.pipeline) is still on the meta device
here; the caller materialises and initialises it afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from titanmm.config.job_config import JobConfig
from titanmm.parallel.activation_checkpoint import apply_ac
from titanmm.parallel.compile import (apply_compile, enable_async_tensor_parallel, mix_order_reduction_enabled,
                                      set_mix_order_reduction)
from titanmm.parallel.context_parallel import apply_context_parallel
from titanmm.parallel.float8 import float8_tp_enabled
from titanmm.parallel.fsdp import DTYPES, apply_fsdp
from titanmm.parallel.parallel_dims import ParallelDims
from titanmm.parallel.tensor_parallel import apply_tp_llama


def fsdp_mesh(dims: ParallelDims):
    """FSDP2 shards over dp_shard x cp; with replicas it is HSDP over (dp_replicate, shard)."""
    if not dims.hsdp_enabled:
        return dims.mesh_for("dp_shard_cp")
    if dims.cp > 1:
        raise NotImplementedError("HSDP with context parallelism")
    return dims.mesh_for("dp_replicate", "dp_shard")


def compute_dtype(config: JobConfig, device_type: str) -> str:
    """The dtype FSDP2 casts parameters to for forward/backward: training.mixed_precision_param, float32 on CPU."""
    return config.training.mixed_precision_param if device_type == "cuda" else "float32"


def frozen_params_dtype(config: JobConfig, device_type: str) -> torch.dtype:
    """The dtype frozen parameters are stored in (training.frozen_params_dtype; "param" = the compute dtype)."""
    name = config.training.frozen_params_dtype  # validated at load
    return DTYPES[compute_dtype(config, device_type) if name == "param" else name]


def uses_autocast(dims: ParallelDims, config: JobConfig, device_type: str) -> bool:
    """One GPU, no parallelism, a low-precision compute dtype and training.single_device_mixed_precision =
    "autocast": mixed precision comes from torch.autocast (`mixed_precision_context`), not from FSDP2."""
    return (device_type == "cuda" and dims.world_size == 1 and compute_dtype(config, device_type) != "float32"
            and config.training.single_device_mixed_precision == "autocast")


def mixed_precision_context(dims: ParallelDims, config: JobConfig, device_type: str):
    """What the model's forward runs under: torch.autocast to the compute dtype when `uses_autocast`, else
    nothing (FSDP2 hands the blocks parameters already cast)."""
    if not uses_autocast(dims, config, device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=DTYPES[compute_dtype(config, device_type)])


def apply_ac_compile_fsdp(model: nn.Module, block_dicts: Sequence[nn.ModuleDict], dims: ParallelDims,
                          config: JobConfig, device_type: str) -> None:
    """Steps 2-4 (AC, compile, FSDP2) per block of each ModuleDict, in forward order; `model` is the root unit."""
    ac = config.activation_checkpoint
    apply_ac(block_dicts, ac.mode, ac.selective_ac_option, ac.memory_budget, ac.all_matmuls_blocks)
    if config.compile.enable:
        if config.compile.enable_async_tensor_parallel and dims.tp_enabled:
            enable_async_tensor_parallel(dims.mesh_for("tp"))
        set_mix_order_reduction(mix_order_reduction_enabled(config.compile.mix_order_reduction, config.float8.enable))
        apply_compile(block_dicts)
    # FSDP2 also provides mixed precision, so it is applied even to a single data-parallel rank on GPU (unless
    # autocast does that there), and wherever parameters are stored in another dtype than the compute dtype
    # (training.frozen_params_dtype).
    if uses_autocast(dims, config, device_type):
        return
    param_dtype = compute_dtype(config, device_type)
    stored_apart = any(p.dtype != DTYPES[param_dtype] for p in model.parameters())
    if dims.dp > 1 or dims.cp > 1 or device_type == "cuda" or stored_apart:
        reduce_dtype = config.training.mixed_precision_reduce if device_type == "cuda" else "float32"
        reshard = config.parallelism.fsdp_reshard_after_forward
        if reshard == "default" and dims.pp > 1:  # a pipeline stage runs forward again for every microbatch
            reshard = "never"
        lm = getattr(model, "lm", model)  # a VisionLanguageModel's language model, or the model itself
        apply_fsdp(model, block_dicts, fsdp_mesh(dims), param_dtype, reduce_dtype, reshard, lm=lm,
                   gradients_in_compute_pool=config.parallelism.fsdp_gradients_in_compute_pool)


def parallelize_llama(model: nn.Module, dims: ParallelDims, config: JobConfig, device_type: str) -> None:
    if dims.tp_enabled:
        apply_tp_llama(model, dims.mesh_for("tp"), loss_parallel=config.parallelism.enable_loss_parallel,
                       float8_tensorwise=float8_tp_enabled(model.layers, config.float8))
    if dims.cp > 1:
        apply_context_parallel(model.layers, dims.mesh_for("cp"))
    apply_ac_compile_fsdp(model, [model.layers], dims, config, device_type)
