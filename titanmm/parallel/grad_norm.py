"""The gradient norm computed during backward, as FSDP2 produces each gradient shard.

Clipping needs the global gradient norm before the optimizer step, and computed after backward it reads every
gradient once more on the compute stream with nothing to overlap (Llama 3 8B over 2 GPUs: 4 B float32 values,
~9 ms of foreach norm kernels per step, the optimizer waiting). FSDP2 reduce-scatters each unit's gradients
during backward and sets each parameter's sharded gradient on its reduce-scatter stream, where it then calls the
parameter's post-accumulate-grad hooks. `BackwardGradNorm` hooks every trainable parameter: the hook computes the
L2 norm of the local shard there, beside the rest of backward, into a slot of a device buffer. After backward
only the combination is left: sums of squares, all-reduced over the ranks that hold shards, a square root.

Parameters may be DTensors over any mesh (FSDP2, HSDP, FSDP2 + TP): the squared norms of the parameters sharded
over the same mesh dimensions are summed together and all-reduced over those dimensions only (a dimension a
parameter is replicated over holds the same values on every rank). Not with pipeline parallelism (the trainer
computes the norm after backward there). With gradient accumulation the hooks fire at every micro-batch; the
last values stand. If a parameter has a gradient whose hook did not fire this step (set some other way),
`total()` returns None and the caller computes the norm after backward as before.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

logger = logging.getLogger("titanmm")


def _sharded(placement) -> bool:
    """Each rank of the mesh dimension holds its own part: Shard, or FSDP2's strided shard over a TP shard (in
    torch 2.13 not a Shard subclass)."""
    return not (placement.is_replicate() or placement.is_partial())


class BackwardGradNorm:
    """Post-accumulate-grad hooks that keep each parameter's gradient-shard norm; `total(params)` combines them
    into the global L2 norm (what `titanmm.optim.clip_grad_norm_` returns) and readies the next step."""

    def __init__(self, params: list[nn.Parameter]):
        if not self.supports(params):
            raise ValueError("BackwardGradNorm needs trainable DTensor parameters on one mesh, each sharded or "
                             "replicated over every mesh dimension")
        self.mesh = params[0].device_mesh
        self.slot = {id(p): i for i, p in enumerate(params)}
        device = params[0]._local_tensor.device
        self.norms = torch.zeros(len(params), dtype=torch.float32, device=device)  # shard norms, this step
        # Slots by the mesh dimensions their parameter is sharded over: (slot indices on the device, dimensions).
        by_dims: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(params):
            sharded_over = tuple(d for d, placement in enumerate(p.placements) if _sharded(placement))
            by_dims.setdefault(sharded_over, []).append(i)
        self.groups = [(torch.tensor(slots, device=device), dims) for dims, slots in by_dims.items()]
        self.fired: set[int] = set()
        self._fallbacks = 0
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    @staticmethod
    def supports(params: list[nn.Parameter]) -> bool:
        """Every parameter a DTensor on the same mesh, sharded or replicated (not partial) over each dimension."""
        if not params or not all(isinstance(p, DTensor) for p in params):
            return False
        mesh = params[0].device_mesh
        return all(p.device_mesh == mesh and all(_sharded(pl) or pl.is_replicate() for pl in p.placements)
                   for p in params)

    @torch.no_grad()
    def _hook(self, param: nn.Parameter) -> None:
        # On FSDP2's reduce-scatter stream, right after it set this gradient shard.
        i = self.slot[id(param)]
        torch.linalg.vector_norm(param.grad._local_tensor, dtype=torch.float32, out=self.norms[i])
        self.fired.add(id(param))

    @torch.no_grad()
    def total(self, params: list[torch.Tensor]) -> torch.Tensor | None:
        """The L2 norm of the gradients of `params` (those with a gradient this step) over all ranks, or None
        when one of them was not produced through a hook this step. Clears the step's norms either way."""
        complete = all(id(p) in self.fired for p in params if p.grad is not None)
        total = None
        if complete:
            squares = self.norms.square()
            total = torch.zeros((), dtype=torch.float32, device=squares.device)
            for slots, dims in self.groups:
                partial = squares[slots].sum()
                for dim in dims:
                    if self.mesh.size(dim) > 1:
                        dist.all_reduce(partial, group=self.mesh.get_group(dim))
                total = total + partial
            total = total.sqrt()
        else:
            self._fallbacks += 1
            if self._fallbacks == 1:
                logger.warning("gradient norm in backward: a gradient was not set by FSDP2's reduce-scatter this "
                               "step; computing the norm after backward")
        self.norms.zero_()  # parameters without a gradient next step count 0
        self.fired.clear()
        return total

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
