"""Attention kernels shared by all models.

`causal_attention` runs causal self-attention through `scaled_dot_product_attention` (flash or
cuDNN on GPU; `set_sdpa_backends` picks which, `[model] sdpa_backends` in a training config). When documents are packed into one sequence, `document_mask` builds a mask that
keeps every token inside its own document: a FlexAttention block mask on GPU, a dense boolean
mask elsewhere. Masks are built once per batch, outside the (compiled) blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

AttentionMask = torch.Tensor | object  # dense bool [B, 1, S, S] or a FlexAttention BlockMask

_compiled_flex_attention = torch.compile(flex_attention, dynamic=False)

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def set_sdpa_backends(names: list[str]) -> None:
    """Put these scaled_dot_product_attention backends first, in this order, in the process-wide priority
    order (the others keep theirs, after them): every SDPA call takes the first backend that accepts its
    inputs. Process-wide because a priority set by `sdpa_kernel(..., set_priority=True)` inside a compiled
    region is dropped when torch.compile re-creates the context. On an H100 cuDNN's kernels run Llama 3 8B's
    causal attention (seq 8192, forward + backward) in 3.6 ms against flash attention's 6.7 ms
    (benchmarks/attention_backends.py)."""
    if not names:
        return
    preferred = [int(SDPA_BACKENDS[name]) for name in names]
    rest = [b for b in torch._C._get_sdp_priority_order() if b not in preferred]
    torch._C._set_sdp_priority_order(preferred + rest)


def _flex(q_bhsd, k_bhsd, v_bhsd, block_mask, enable_gqa):
    # Inside a compiled block the plain op is traced into the block's graph; in eager mode the
    # compiled kernel is called (flex_attention has no fast eager path).
    fn = flex_attention if torch.compiler.is_compiling() else _compiled_flex_attention
    return fn(q_bhsd, k_bhsd, v_bhsd, block_mask=block_mask, enable_gqa=enable_gqa)


def document_mask(document_ids_bs: torch.Tensor) -> AttentionMask:
    """Causal mask restricted to tokens of the same document; document_ids_bs: [batch, seq]."""
    batch, seq = document_ids_bs.shape
    if document_ids_bs.is_cuda:
        doc = document_ids_bs

        def same_document_causal(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (doc[b, q_idx] == doc[b, kv_idx])

        return create_block_mask(same_document_causal, batch, None, seq, seq, device=doc.device)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids_bs.device).tril()
    same_doc = document_ids_bs[:, :, None] == document_ids_bs[:, None, :]
    return (same_doc & causal)[:, None]


def causal_attention(q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor,
                     mask: AttentionMask | None = None) -> torch.Tensor:
    """Causal attention with grouped-query heads (k/v may have fewer heads than q)."""
    gqa = q_bhsd.shape[1] != k_bhsd.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, torch.Tensor):
        if gqa and q_bhsd.shape[2] == 1 and mask.shape[1] == 1:
            return _decode_attention(q_bhsd, k_bhsd, v_bhsd, mask)
        return F.scaled_dot_product_attention(q_bhsd, k_bhsd, v_bhsd, attn_mask=mask, enable_gqa=gqa)
    return _flex(q_bhsd, k_bhsd, v_bhsd, mask, gqa)


def _decode_attention(q_bh1d: torch.Tensor, k_bkld: torch.Tensor, v_bkld: torch.Tensor,
                      mask_b11l: torch.Tensor) -> torch.Tensor:
    """One query per row with grouped-query heads: the G = H / KV query heads that share a key/value head
    become G query rows of that head, q [B, H, 1, D] -> [B, KV, G, D] (heads kv * G .. kv * G + G - 1 use
    key/value head kv, as `enable_gqa` does). Plain attention then reads each key/value head once, where
    `enable_gqa` with a mask takes the math kernel, which first copies every key/value head G times."""
    b, h, _, d = q_bh1d.shape
    out_bkgd = F.scaled_dot_product_attention(q_bh1d.reshape(b, k_bkld.shape[1], h // k_bkld.shape[1], d),
                                              k_bkld, v_bkld, attn_mask=mask_b11l)
    return out_bkgd.reshape(b, h, 1, d)


class CausalAttentionKernel(nn.Module):
    """`causal_attention` as a (parameter-free) module: the language model's attention kernel. Being a
    module lets parallelism target exactly these calls (context parallelism hooks it to run ring
    attention) and not other attention in the model (a vision tower's)."""

    def forward(self, q_bhsd: torch.Tensor, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor,
                mask: AttentionMask | None = None) -> torch.Tensor:
        return causal_attention(q_bhsd, k_bhsd, v_bhsd, mask)
