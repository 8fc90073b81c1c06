"""The output layer of a language model, which can also return the summed cross-entropy of given labels without
ever holding the [tokens, vocabulary] logits.

Given labels, `LMHead` computes the logits `loss_chunk_tokens` tokens at a time, and with each chunk's logits
the loss and both gradients (of the hidden states and of the weight): the loss is the end of the graph, so its
backward only has to scale them. For Llama 3 at 8,192 tokens a step then never holds the bf16 logits and their
gradient (2 GiB each) but one chunk's. The weight gradient adds up chunk after chunk in the weight's dtype (one
rounding per chunk; the logits path rounds once). It is the fused linear + cross-entropy of Liger-Kernel and
Apple's cut-cross-entropy, in plain PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from titanmm.data.packed import IGNORE_INDEX  # labels that do not count


def cross_entropy_sum_and_grad(logits_cv: torch.Tensor, labels_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the token cross-entropies in float32 (float64 for float64 logits), its gradient w.r.t. the logits
    in their dtype); labels IGNORE_INDEX add nothing and get a zero gradient row. Consumes `logits_cv` (float32
    and float64 logits are overwritten). Eager, it holds one float32 copy of the chunk; compiled, it is two fused
    passes over it."""
    x_cv = logits_cv if logits_cv.dtype == torch.float64 else logits_cv.float()
    lse_c = torch.logsumexp(x_cv, dim=-1)
    counted_c = labels_c != IGNORE_INDEX
    safe_c = torch.where(counted_c, labels_c, 0)[:, None]
    loss = torch.where(counted_c, lse_c - x_cv.gather(1, safe_c).squeeze(1), 0.0).sum()
    x_cv.sub_(lse_c[:, None]).exp_()  # softmax, in place
    x_cv.scatter_add_(1, safe_c, -counted_c[:, None].to(x_cv.dtype))  # minus the one-hot label
    x_cv.mul_(counted_c[:, None])
    return loss, x_cv.to(logits_cv.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_nd: torch.Tensor, weight_vd: torch.Tensor, labels_n: torch.Tensor, chunk_tokens: int,
                chunk_fn: Callable) -> torch.Tensor:
        # Under autocast the matmuls run in its dtype, as the logits path's would; the weight is cast once.
        compute_dtype = torch.get_autocast_dtype(h_nd.device.type) if torch.is_autocast_enabled(
            h_nd.device.type) else h_nd.dtype
        with torch.autocast(h_nd.device.type, enabled=False):
            w_vd = weight_vd.to(compute_dtype)
            grad_h_nd = torch.empty_like(h_nd)
            grad_w_vd = torch.zeros_like(weight_vd) if ctx.needs_input_grad[1] else None  # None: a frozen head
            loss = torch.zeros((), dtype=torch.promote_types(compute_dtype, torch.float32), device=h_nd.device)
            for start in range(0, h_nd.shape[0], chunk_tokens):
                h_cd = h_nd[start:start + chunk_tokens].to(compute_dtype)
                chunk_loss, grad_logits_cv = chunk_fn(h_cd @ w_vd.t(), labels_n[start:start + chunk_tokens])
                loss += chunk_loss
                grad_h_nd[start:start + chunk_tokens] = grad_logits_cv @ w_vd
                if grad_w_vd is None:
                    continue
                if grad_w_vd.dtype == compute_dtype:
                    grad_w_vd.addmm_(grad_logits_cv.t(), h_cd)
                else:  # float32 weights under autocast: a bf16 product per chunk, summed in float32
                    grad_w_vd += grad_logits_cv.t() @ h_cd
        ctx.save_for_backward(grad_h_nd, grad_w_vd)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # The gradients are scaled in place (a second weight-sized buffer would undo the saving): once only.
        if getattr(ctx, "backward_done", False):
            raise RuntimeError("the chunked linear cross-entropy's backward can run once (no retain_graph)")
        ctx.backward_done = True
        grad_h_nd, grad_w_vd = ctx.saved_tensors
        if grad_w_vd is not None:
            grad_w_vd.mul_(grad_loss.to(grad_w_vd.dtype))
        return grad_h_nd.mul_(grad_loss.to(grad_h_nd.dtype)), grad_w_vd, None, None, None


def linear_cross_entropy_sum(h_nd: torch.Tensor, weight_vd: torch.Tensor, labels_n: torch.Tensor,
                             chunk_tokens: int, chunk_fn: Callable = cross_entropy_sum_and_grad) -> torch.Tensor:
    """sum over tokens i with labels_n[i] != IGNORE_INDEX of cross_entropy(h_nd[i] @ weight_vd.T, labels_n[i]),
    float32, computed `chunk_tokens` tokens at a time with its gradients (see the module docstring)."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens = {chunk_tokens}; expected a positive number of tokens")
    return _ChunkedLinearCrossEntropy.apply(h_nd, weight_vd, labels_n, chunk_tokens, chunk_fn)


class LMHead(nn.Linear):
    """nn.Linear(dim, vocab_size, bias=False) (same parameters and state dict) whose forward also takes labels:
    `head(h)` -> logits [..., V]; `head(h, labels=labels)` -> the summed cross-entropy of labels [...] (float32
    scalar), never holding the logits. `loss_chunk_tokens` and `chunk_fn` (e.g. a compiled
    `cross_entropy_sum_and_grad`) are set by the trainer."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__(dim, vocab_size, bias=False)
        self.loss_chunk_tokens = 1024
        self.chunk_fn: Callable = cross_entropy_sum_and_grad

    def forward(self, h: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(h)
        return linear_cross_entropy_sum(h.flatten(0, -2), self.weight, labels.flatten(), self.loss_chunk_tokens,
                                        self.chunk_fn)
