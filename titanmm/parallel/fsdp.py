"""FSDP2 (fully_shard) per transformer block, then the root; HSDP when the mesh has two dims."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def apply_fsdp(model: nn.Module, block_dicts: Sequence[nn.ModuleDict], dp_mesh: DeviceMesh, param_dtype: str,
               reduce_dtype: str, reshard_after_forward: str = "default", lm: nn.Module | None = None) -> None:
    """fully_shard every block of each ModuleDict (in forward order), the language model `lm`'s token embedding
    and its final norm + output layer as units of their own, then `model` as the root unit.

    Own units for the embedding and the output layer (each a 128k x 4096 matrix for Llama 3) let their
    all-gathers and gradient reduce-scatters overlap with the blocks' compute: in the root unit the whole
    gather came before the first block and the whole reduce-scatter after the last backward. With
    `reshard_after_forward="default"` the final norm + output layer stay gathered after forward (backward starts
    with them) and every other unit is resharded; "always" / "never" apply to all. A tied embedding stays in the
    root.

    Parameters are cast to `param_dtype` for compute. Frozen ones may be stored in another dtype than the
    trainable ones of their unit (training.frozen_params_dtype): FSDP2 requires one dtype among trainable
    parameters only, and all-gathers a unit's parameters in one dtype once cast."""
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])

    def shard(module, reshard: bool) -> None:
        fully_shard(module, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)

    embedding, head = lm_edge_units(lm) if lm is not None else (None, [])
    if embedding is not None:
        shard(embedding, reshard_after_forward != "never")
    for blocks in block_dicts:
        for block in blocks.values():
            # Every block, the last one too: its all-gather in backward hides under the output layer's backward,
            # while keeping it gathered raised the full 8B's peak by its 0.4 GiB over torchtitan's.
            shard(block, reshard_after_forward != "never")
    if head:
        shard(head, reshard_after_forward == "always")
    # What is left (patch embedding, projector, a tied embedding, ...) forms the root unit.
    shard(model, reshard_after_forward == "always")


def lm_edge_units(lm: nn.Module) -> tuple[nn.Module | None, list[nn.Module]]:
    """(token embedding, [final norm, output layer]) of a titanmm language model, to shard as units of their own:
    those it has (a pipeline stage may lack them), and neither when the output layer is tied to the embedding."""
    embedding, norm, output = (getattr(lm, name, None) for name in ("tok_embeddings", "norm", "output"))
    if embedding is not None and output is not None and output.weight is embedding.weight:
        return None, []
    return embedding, [m for m in (norm, output) if m is not None]
