"""Per-token loss weights for square-root length loss scaling (`multimodal.loss_scaling = "sqrt_length"`).

Megatron-LM's `--use-loss-scaling` (examples/multimodal/train.py `scaled_loss_func`, used for
Llama-3.1-Nemotron-Nano-VL-8B) splits the trained tokens into turns, runs of consecutive tokens whose
labels count, and computes

    loss = sum_t [ sum(CE of turn t) / sqrt(n_t) ] / sum_t sqrt(n_t)        (n_t = tokens of turn t)

i.e. each turn's mean token loss weighted by sqrt(n_t): a long reply counts more than a short one, but less
than in proportion to its length. Written with per-token weights w = 1 / sqrt(n_t) on every token of turn
t (0 on untrained tokens) this is sum(w * CE) / sum(w), because the weights of a turn sum to sqrt(n_t).
The trainer does exactly that, with both sums over the whole global batch (Megatron normalises within
each micro-batch and then averages the micro-batches). Turns never cross a packed document boundary.
"""

from __future__ import annotations

import torch

from titanmm.data.packed import IGNORE_INDEX


def sqrt_length_weights(labels: torch.Tensor, document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] float32 weights: 1 / sqrt(n) on each token of a run of n consecutive trained tokens
    (labels != IGNORE_INDEX, within one row and one document), 0 on every other token."""
    trained = labels != IGNORE_INDEX
    starts = trained.clone()
    continues = trained[:, 1:] & trained[:, :-1]
    if document_ids is not None:
        continues &= document_ids[:, 1:] == document_ids[:, :-1]
    starts[:, 1:] &= ~continues
    run_ids = torch.cumsum(starts.flatten(), 0).view_as(labels) * trained  # 1, 2, ... per run; 0 untrained
    lengths = torch.bincount(run_ids.flatten()).to(torch.float32)
    weights = lengths[run_ids].rsqrt()
    return torch.where(trained, weights, torch.zeros_like(weights))
