"""Activation checkpointing of transformer blocks: full, every N-th block, per-op selective, or a memory budget.

Per-op selective keeps the outputs of attention kernels and of every other matmul ("op", torchtitan's policy)
or of every matmul, FP8 ones included ("op_all_matmuls"), and recomputes the cheap element-wise work (norms,
activations, RoPE, FP8 casts) in backward. With a memory
budget no block is wrapped: torch.compile's min-cut partitioner chooses, per compiled block, the
saved activations that cost least recompute within the budget.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

_ALWAYS_SAVE = {
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten.max.default,
}
for _name in ("reduce_scatter_tensor", "all_gather_into_tensor"):
    if hasattr(torch.ops._c10d_functional, _name):
        _ALWAYS_SAVE.add(getattr(torch.ops._c10d_functional, _name).default)


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten._scaled_mm.default}


def _op_selective_context(every_matmul: bool = False):
    counts = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        mode = "recompute" if ctx.is_recompute else "forward"
        if func == torch.ops.aten.mm.default:
            counts[f"{mode}_mm"] += 1
        if every_matmul:  # no matmul recomputed: only element-wise work
            save = func in _ALWAYS_SAVE or func in _MATMULS
        else:  # every other (bf16) matmul output: half the matmul recompute for half the memory
            save = func in _ALWAYS_SAVE or (func == torch.ops.aten.mm.default and counts[f"{mode}_mm"] % 2 == 1)
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def wrap_block(block: nn.Module, mode: str, selective_option: str, block_index: int,
               all_matmuls_blocks: int = -1) -> nn.Module:
    """Return `block` wrapped for activation checkpointing (or unchanged). With "op_all_matmuls", blocks from
    index `all_matmuls_blocks` on (when >= 0) keep every other matmul output only, as "op"."""
    if mode in ("none", "memory_budget"):
        return block
    if mode == "full":
        return checkpoint_wrapper(block, preserve_rng_state=False)
    if selective_option in ("op", "op_all_matmuls"):
        every_matmul = selective_option == "op_all_matmuls" and not 0 <= all_matmuls_blocks <= block_index
        context_fn = functools.partial(_op_selective_context, every_matmul=every_matmul)
        return checkpoint_wrapper(block, context_fn=context_fn, preserve_rng_state=False)
    every = int(selective_option)
    return checkpoint_wrapper(block, preserve_rng_state=False) if block_index % every == 0 else block


def apply_ac(block_dicts: Sequence[nn.ModuleDict], mode: str, selective_option: str,
             memory_budget: float = 1.0, all_matmuls_blocks: int = -1) -> None:
    """Wrap every block of each ModuleDict in place (every-N-th and `all_matmuls_blocks` count from each dict's
    first block). Mode memory_budget sets the compiler's activation budget instead (process-wide, read when a
    block compiles)."""
    if mode == "memory_budget":
        import torch._functorch.config as functorch_config

        functorch_config.activation_memory_budget = memory_budget
    for blocks in block_dicts:
        for index, (name, block) in enumerate(list(blocks.items())):
            blocks[name] = wrap_block(block, mode, selective_option, index, all_matmuls_blocks)
