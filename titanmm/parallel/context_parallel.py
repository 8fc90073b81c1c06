"""Context parallelism: the sequence of every micro-batch is split over the `cp` mesh and the language
model's attention runs as ring attention (torch's experimental context-parallel attention).

`apply_context_parallel` hooks each `CausalAttentionKernel` of the language model: its q/k/v become DTensors
sharded on the sequence of the cp mesh, which DTensor dispatches to ring attention (each rank's K/V shards
travel around the ring by `allgather` or `alltoall` rotation; partial results merge by log-sum-exp), in
forward and backward. Other attention (a vision tower's) is untouched.

`context_parallel_micro_batch` shards the [batch, seq] tensors of a micro-batch (token ids, labels,
positions, per-token loss weights, and for a VLM the image-feature index) on the sequence: it is cut into
2 x cp chunks and rank r keeps chunks r and 2cp-1-r (head-tail load balancing: every rank gets the same
causal attention work), and enables the ring-attention dispatch for forward and backward. RoPE stays exact
because the positions are sharded with the tokens. FSDP shards over dp_shard x cp, so the cp ranks also
split the parameters; the trainer counts the trained tokens of the global batch once (not once per cp
rank) so the loss is normalised as without CP.

A VLM's images are encoded on every cp rank, and each image token fetches its own embedding through the
image-feature index sharded with it: the image embeddings are merged as if the sequence were whole.

Limits (checked at config load): causal attention without per-document masks (the ring kernels are
SDPA's flash / efficient / cuDNN ones, with no masks) and a sequence length divisible by 2 x cp x tp; GPU
only (CPU has no ring attention kernels).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

# Keys of a micro-batch that run along the sequence (dimension 1) and must be sharded with it.
SEQUENCE_KEYS = ("input_ids", "labels", "position_ids", "loss_weights", "image_feature_index")


def image_feature_index(input_ids_bs: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B, S] row of the batch's image embeddings each image token takes (in order over the whole batch);
    -1 elsewhere."""
    is_image = input_ids_bs == image_token_id
    index = is_image.flatten().cumsum(0).view_as(input_ids_bs) - 1
    return torch.where(is_image, index, torch.full_like(index, -1))


def apply_context_parallel(layers: nn.ModuleDict, cp_mesh: DeviceMesh) -> None:
    """Make the attention kernel of every block run ring attention over `cp_mesh` (before AC / compile)."""
    from torch.distributed.tensor.experimental._attention import _ContextParallel
    from torch.distributed.tensor.parallel import parallelize_module

    style = _ContextParallel(seq_dim=2, attention_type=_ContextParallel.AttentionType.SDPA)
    for block in layers.values():
        parallelize_module(block.attention.kernel, cp_mesh, style)


@contextlib.contextmanager
def context_parallel_micro_batch(cp_mesh: DeviceMesh, batch: dict[str, torch.Tensor], rotate_method: str):
    """Replace the sequence tensors of `batch` (on the device) by this rank's load-balanced shards and run
    ring attention for everything inside (forward and backward)."""
    from torch.distributed.tensor.experimental._attention import (_context_parallel_shard,
                                                                   _disable_context_parallel_dispatcher,
                                                                   _enable_context_parallel_dispatcher,
                                                                   _HeadTailLoadBalancer, set_rotate_method)

    set_rotate_method(rotate_method)
    keys = [k for k in SEQUENCE_KEYS if k in batch]
    seq_len = batch["input_ids"].shape[1]
    balancer = _HeadTailLoadBalancer(seq_len, cp_mesh.size(), batch["input_ids"].device)
    shards = _context_parallel_shard(cp_mesh, [batch[k] for k in keys], [1] * len(keys), load_balancer=balancer)
    batch.update(zip(keys, shards))
    _enable_context_parallel_dispatcher()
    try:
        yield
    finally:
        _disable_context_parallel_dispatcher()
