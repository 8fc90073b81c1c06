"""Parallelize a vision-language model, in the same order as `parallelize_llama`: TP -> CP -> AC -> compile -> FSDP.

1. Tensor parallel: ViT blocks, projector and language model (`tensor_parallel_vision.apply_tp_vlm`).
2. Activation checkpointing wraps each ViT block and each LM block.
3. torch.compile compiles each (wrapped) block of both towers.
4. FSDP2 shards the token embedding, each ViT block, each LM block, the final norm + output layer, then the
   root (patch embedding, projector, ...) over the data-parallel mesh (HSDP with replicas).
The model is still on the meta device here; the caller materialises and initialises it afterwards.

Every rank must run the vision tower in every step under FSDP (its all-gathers are collective):
batches without images pass an empty `pixel_values` of shape [0, 3, H, W], which
`VisionLanguageModel.forward` accepts.
"""

from __future__ import annotations

from torch import nn

from titanmm.config.job_config import JobConfig
from titanmm.parallel.context_parallel import apply_context_parallel
from titanmm.parallel.parallel_dims import ParallelDims
from titanmm.parallel.parallelize import apply_ac_compile_fsdp
from titanmm.parallel.tensor_parallel_vision import apply_tp_vlm


def block_containers(model: nn.Module) -> list[nn.ModuleDict]:
    """The ModuleDicts of transformer blocks: the vision tower's `blocks` (first pipeline stage only), then the
    LM's `layers`."""
    return ([model.vision.blocks] if model.vision is not None else []) + [model.lm.layers]


def parallelize_vlm(model: nn.Module, dims: ParallelDims, config: JobConfig, device_type: str) -> None:
    """Apply TP, AC, compile and FSDP2 to a `VisionLanguageModel` (or a pipeline stage of one) as configured."""
    if dims.tp_enabled:
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]  # model.freeze
        apply_tp_vlm(model, dims.mesh_for("tp"), loss_parallel=config.parallelism.enable_loss_parallel)
        for name in frozen:  # SequenceParallel re-creates the norms' parameters, trainable
            model.get_parameter(name).requires_grad_(False)
    if dims.cp > 1:  # ring attention in the language model only; the vision tower sees whole images
        apply_context_parallel(model.lm.layers, dims.mesh_for("cp"))
    # By default only the LM's final norm + output layer stay gathered after forward (backward needs them first).
    apply_ac_compile_fsdp(model, block_containers(model), dims, config, device_type)
