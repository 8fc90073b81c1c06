"""Inference: linears that read the same input, projected by one matmul.

At small batches a decode step is memory-bound, and one matmul over the concatenated weights streams them faster
than one matmul each (Llama 3 8B at batch 32 on an H100: q, k, v separately 0.084 ms a block, fused 0.041; w1 and
w3 0.114 against 0.101; `benchmarks/fused_projections.py`). `fuse_linears` stores the weights (and biases) of such
linears in one tensor of which their parameters become views: the same Parameter objects, so the state dict,
optimizers and in-place updates are unchanged and reach both. Replacing a weight or bias (`to()`, `load_state_dict(...,
assign=True)`) ends the sharing, which `still_fused` detects. Plain tensors only: tensor-parallel or FSDP DTensors
are left alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


@torch.no_grad()
def fuse_linears(linears: Sequence[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights [out_i, in] (and biases) of `linears` into one [sum out_i, in] tensor, make each
    weight a view of its rows, and return (fused weight, fused bias or None)."""
    fused_parts = []
    with torch.inference_mode(False):  # real tensors, which training may still update in place
        for attribute in ("weight", "bias"):
            parts = [getattr(linear, attribute) for linear in linears]
            if parts[0] is None:
                fused_parts.append(None)
                continue
            fused = torch.cat([p.detach() for p in parts])
            offset = 0
            for p in parts:
                p.data = fused[offset:offset + p.shape[0]]
                offset += p.shape[0]
            fused_parts.append(fused)
    return fused_parts[0], fused_parts[1]


def still_fused(linears: Sequence[nn.Linear], fused_weight: torch.Tensor | None,
                fused_bias: torch.Tensor | None = None) -> bool:
    """Whether every weight (and bias) of `linears` is (still) a view of `fused_weight` (and `fused_bias`)."""
    def shares(tensor: torch.Tensor | None, fused: torch.Tensor | None) -> bool:
        if tensor is None or fused is None:
            return tensor is None and fused is None
        return tensor.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()

    return fused_weight is not None and all(
        shares(linear.weight, fused_weight) and shares(linear.bias, fused_bias) for linear in linears)
