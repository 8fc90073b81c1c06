"""FSDP2 (fully_shard) per transformer block, then the root; HSDP when the mesh has two dims."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def apply_fsdp(model: nn.Module, block_dicts: Sequence[nn.ModuleDict], dp_mesh: DeviceMesh, param_dtype: str,
               reduce_dtype: str, reshard_after_forward: str = "default", lm: nn.Module | None = None,
               gradients_in_compute_pool: bool = False) -> None:
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
    parameters only, and all-gathers a unit's parameters in one dtype once cast.

    `gradients_in_compute_pool`: every unit's reduce-scatter writes its sharded gradients into memory of the
    compute stream's pool (ComputePoolReduceScatter)."""
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    reduce_scatter = ComputePoolReduceScatter() if gradients_in_compute_pool else None

    def shard(module: nn.Module | list[nn.Module], reshard: bool) -> None:
        fully_shard(module, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
        if reduce_scatter is not None:  # a list of modules forms one unit: set on any of them
            (module[0] if isinstance(module, list) else module).set_custom_reduce_scatter(reduce_scatter)

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


class ComputePoolReduceScatter:
    """FSDP2's reduce-scatter (a `torch.distributed.fsdp` custom ReduceScatter), its output taken from the compute
    stream's memory pool rather than the reduce-scatter stream's (parallelism.fsdp_gradients_in_compute_pool).

    FSDP2 allocates each unit's reduce-scatter output, which becomes that unit's sharded gradients, while its
    reduce-scatter stream is current. The caching allocator keeps memory per stream, so the gradients (for
    Llama 3 8B in float32 over 2 GPUs, 15 GiB) occupy a pool of their own that activations, allocated on the
    compute stream and freed as the gradients appear, can never reuse, and the reserved peak is the sum of the
    two peaks instead of the peak of their sum. Here the output is allocated from the compute stream's pool
    and `record_stream` tells the allocator that the reduce-scatter stream uses it, so a freed gradient (or an
    accumulated micro-batch's output) is reused only after that stream's work on it. The compute stream is the
    one current when this object is made (the trainer's, on its device; elsewhere allocation is left alone). The
    reduce-scatter input is already allocated on it. Taking compute-stream memory from another stream is safe here
    because FSDP2 (torch 2.11, 2.13) makes the reduce-scatter stream wait for the compute stream before the
    reduce-scatter writes the output, so earlier compute-stream work on that memory has finished. (Not so for the
    all-gather output: the copy-in stream waits only for particular events, so that buffer stays in its own pool.)
    A gradient cast to another dtype after the reduce (reduce dtype not the parameters') is still allocated on
    the reduce-scatter stream."""

    def __init__(self):
        self.compute_stream = torch.cuda.current_stream() if torch.cuda.is_available() else None

    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        # Already the compute stream, or another device than the trainer's: FSDP2's own allocation.
        if stream is None or self.compute_stream is None or stream == self.compute_stream \
                or stream.device != self.compute_stream.device:
            return torch.empty(*size, dtype=dtype, device=device)
        with torch.cuda.stream(self.compute_stream):
            tensor = torch.empty(*size, dtype=dtype, device=device)
        tensor.record_stream(stream)
        return tensor

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op, async_op: bool = False):
        return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)


def lm_edge_units(lm: nn.Module) -> tuple[nn.Module | None, list[nn.Module]]:
    """(token embedding, [final norm, output layer]) of a titanmm language model, to shard as units of their own:
    those it has (a pipeline stage may lack them), and neither when the output layer is tied to the embedding."""
    embedding, norm, output = (getattr(lm, name, None) for name in ("tok_embeddings", "norm", "output"))
    if embedding is not None and output is not None and output.weight is embedding.weight:
        return None, []
    return embedding, [m for m in (norm, output) if m is not None]


def unit_parameters(unit: nn.Module) -> list[nn.Parameter]:
    """The parameters an FSDP2 unit manages itself: its parameters less those of the units inside it."""
    inner = {id(p) for child in unit.modules() if child is not unit and isinstance(child, FSDPModule)
             for p in child.parameters()}
    return [p for p in unit.parameters() if id(p) not in inner]


class GatherDuringOptimizer:
    """Starts the next step's first all-gathers inside the optimizer step (parallelism.fsdp_gather_during_optimizer).

    After the optimizer step FSDP2 all-gathers the units that open the forward (the token embedding, then the
    first block) with nothing to overlap them: the first kernels of the forward wait for them. Here the compiled
    AdamW (titanmm.compiled_adamw) updates those units' parameters first and then calls `start`, which issues
    their all-gathers (`FSDPModule.unshard(async_op=True)`) beside the updates of all the other parameters; the
    units' pre-forward hooks wait for them. Units holding FP8 all-gather weights are left out: their scales are
    computed after the whole optimizer step. `arm(True)` before each step that a forward follows; `finish()`
    when training stops waits for a pending all-gather and frees it."""

    def __init__(self, units: list[nn.Module], optimizers: list[torch.optim.Optimizer]):
        from torch.utils._python_dispatch import is_traceable_wrapper_subclass

        owned = [(u, unit_parameters(u)) for u in units]
        owned = [(u, params) for u, params in owned
                 if params and not any(is_traceable_wrapper_subclass(p._local_tensor) for p in params)]
        self.units = [u for u, _ in owned]
        first = frozenset(id(p) for _, params in owned for p in params)
        for optimizer in optimizers:
            optimizer.first_params, optimizer.after_first_params = first, self.start
        self.armed = False
        self.pending = []  # (unit, handle) of the last step's all-gathers

    def arm(self, next_forward: bool) -> None:
        """Whether a forward follows the coming optimizer step (not after the last one)."""
        self.armed = next_forward

    def start(self) -> None:
        if self.armed:
            # Explicit unshards copy in on the current stream; the all-gathers run on NCCL's, waiting only for
            # the updates queued so far.
            self.pending = [(unit, unit.unshard(async_op=True)) for unit in self.units]
        self.armed = False

    def finish(self) -> None:
        """Wait for and free all-gathers no forward consumed (training stopped after the step)."""
        for unit, handle in self.pending:
            if handle is not None:
                handle.wait()  # a no-op once a forward waited for it
            unit.reshard()
        self.pending = []


def first_forward_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units of a titanmm language model whose all-gathers open its forward, in order: the root's own
    parameters (a tied embedding), the token embedding, the first block."""
    blocks = list(getattr(model, "layers", {}).values()) if hasattr(model, "layers") else []
    candidates = [model, getattr(model, "tok_embeddings", None), blocks[0] if blocks else None]
    return [m for m in candidates if isinstance(m, FSDPModule)]
