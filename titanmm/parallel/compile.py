"""torch.compile per transformer block: one graph reused by every block, fusions inside it.

Inductor's mix-order reduction (`compile.mix_order_reduction`) is set process-wide before the first compile: off by
default under FP8 (see the config field for the measurement).

Async tensor parallelism (`compile.enable_async_tensor_parallel`): inductor's micro-pipelining splits each
TP all-gather -> matmul and matmul -> reduce-scatter pair into chunks that overlap communication with
compute, through symmetric memory on the TP group (NVLink GPUs only).
"""

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def mix_order_reduction_enabled(setting: str, float8: bool) -> bool:
    """compile.mix_order_reduction resolved: "on", "off", or "auto" (off under FP8)."""
    return setting == "on" or (setting == "auto" and not float8)


def set_mix_order_reduction(enabled: bool) -> None:
    """Inductor's switch, where this torch has it (process-wide; read when a graph is compiled)."""
    triton_config = torch._inductor.config.triton
    if hasattr(triton_config, "mix_order_reduction"):
        triton_config.mix_order_reduction = enabled


def apply_compile(block_dicts: Sequence[nn.ModuleDict]) -> None:
    for blocks in block_dicts:
        for block in blocks.values():
            block.compile(fullgraph=True)


def enable_async_tensor_parallel(tp_mesh: DeviceMesh) -> None:
    """Let the compiled blocks overlap TP collectives with their matmuls (must precede compilation)."""
    from torch.distributed import _symmetric_memory

    torch._inductor.config._micro_pipeline_tp = True
    enable = getattr(_symmetric_memory, "enable_symm_mem_for_group", None)  # automatic on newer torch
    if enable is not None:
        enable(tp_mesh.get_group().group_name)
