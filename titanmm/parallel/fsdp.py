"""FSDP2 (fully_shard) per transformer block, then the root; HSDP when the mesh has two dims."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def apply_fsdp(model: nn.Module, block_dicts: Sequence[nn.ModuleDict], dp_mesh: DeviceMesh, param_dtype: str,
               reduce_dtype: str, reshard_after_forward: str = "default") -> None:
    """fully_shard every block of each ModuleDict (in forward order), then `model` as the root unit.

    Parameters are cast to `param_dtype` for compute. Frozen ones may be stored in another dtype than the
    trainable ones of their unit (training.frozen_params_dtype): FSDP2 requires one dtype among trainable
    parameters only, and all-gathers a unit's parameters in one dtype once cast."""
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    for blocks in block_dicts:
        items = list(blocks.values())
        for index, block in enumerate(items):
            if reshard_after_forward == "default":
                # The very last block's parameters are needed again right away by backward.
                reshard = not (blocks is block_dicts[-1] and index == len(items) - 1)
            else:
                reshard = reshard_after_forward == "always"
            fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
    # What is left (embeddings, final norm, output layer, projector, ...) forms the root unit.
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward == "always")
