"""Llama-family decoder: pre-norm blocks of grouped-query attention with RoPE and a SwiGLU MLP.

Plain single-device module. Parallelism is applied from outside (titanmm.parallel). Any of
`tok_embeddings`, `norm`, `output` may be set to None by pipeline splitting; `layers` is a
ModuleDict keyed by the global layer index so names stay the same on every stage.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from titanmm.models import init
from titanmm.models.attention import AttentionMask, CausalAttentionKernel, document_mask
from titanmm.models.fused_linears import fuse_linears, still_fused
from titanmm.models.kv_cache import KVCache, LayerKVCache
from titanmm.models.llama.args import TransformerArgs
from titanmm.models.lm_head import LMHead
from titanmm.models.norms import RMSNorm
from titanmm.models.rope import apply_rope, rope_table


class Attention(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kernel = CausalAttentionKernel()
        # Inference only (`Transformer.fused_projections`): wq, wk, wv as views of one [q + k + v, dim] weight,
        # projected in one matmul while `use_fused_projections` is on and no gradients are recorded.
        self.register_buffer("wqkv_weight", None, persistent=False)
        self.register_buffer("wqkv_bias", None, persistent=False)
        self.use_fused_projections = False

    def forward(self, x_bsd: torch.Tensor, rope_bs2d: torch.Tensor, mask: AttentionMask | None,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        """`cache` (inference only): this layer's KV cache; the new keys / values are written into it
        and the queries attend over everything cached so far (`mask` then comes from the cache)."""
        bs, seq, _ = x_bsd.shape
        if self.use_fused_projections and not torch.is_grad_enabled():  # one matmul (fuse_projections)
            q, k, v = F.linear(x_bsd, self.wqkv_weight, self.wqkv_bias).split(self._qkv_sizes(), dim=-1)
        else:
            q, k, v = self.wq(x_bsd), self.wk(x_bsd), self.wv(x_bsd)
        # Head counts come from the tensors: under tensor parallelism each rank holds a subset.
        q = q.view(bs, seq, -1, self.head_dim)
        k = k.view(bs, seq, -1, self.head_dim)
        v = v.view(bs, seq, -1, self.head_dim)
        q, k = apply_rope(q, k, rope_bs2d)
        k_bhsd, v_bhsd = k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k_bhsd, v_bhsd = cache.update(k_bhsd, v_bhsd)
        out = self.kernel(q.transpose(1, 2), k_bhsd, v_bhsd, mask)
        return self.wo(out.transpose(1, 2).reshape(bs, seq, -1))

    def _qkv_sizes(self) -> list[int]:
        return [self.wq.weight.shape[0], self.wk.weight.shape[0], self.wv.weight.shape[0]]

    def fuse_projections(self) -> None:
        """Make wq, wk and wv views of `wqkv_weight` (again, where a weight was replaced since)."""
        projections = (self.wq, self.wk, self.wv)
        if not still_fused(projections, self.wqkv_weight, self.wqkv_bias):
            self.wqkv_weight, self.wqkv_bias = fuse_linears(projections)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        # Inference only (`Transformer.fused_projections`): w1, w3 as views of one [2 x hidden, dim] weight.
        self.register_buffer("w13_weight", None, persistent=False)
        self.use_fused_projections = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_fused_projections and not torch.is_grad_enabled():  # one matmul (fuse_projections)
            gate, up = F.linear(x, self.w13_weight).chunk(2, dim=-1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)

    def fuse_projections(self) -> None:
        """Make w1 and w3 views of `w13_weight` (again, where a weight was replaced since)."""
        if not still_fused((self.w1, self.w3), self.w13_weight):
            self.w13_weight, _ = fuse_linears((self.w1, self.w3))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: TransformerArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x_bsd: torch.Tensor, rope_bs2d: torch.Tensor, mask: AttentionMask | None = None,
                cache: LayerKVCache | None = None):
        # `cache` goes by keyword: tensor-parallel input plans describe the positional inputs only.
        h = x_bsd + self.attention(self.attention_norm(x_bsd), rope_bs2d, mask, cache=cache)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: TransformerArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = LMHead(args.dim, args.vocab_size)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope_cache", self._rope_cache(), persistent=False)

    def _rope_cache(self, device=None) -> torch.Tensor:
        a = self.args
        return rope_table(a.head_dim, a.max_seq_len, a.rope_theta, a.rope_scaling, device=device)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: [B, S] ids (or [B, S, D] hidden states on a pipeline stage without embeddings).

        position_ids: [B, S] RoPE positions (default 0..S-1). document_ids: [B, S]; when given,
        attention stays inside each document. Returns logits [B, S, V] (or hidden states when
        this stage has no output layer). cache: see `forward_embeddings`. labels [B, S]: return the
        summed cross-entropy instead, without holding the logits (`LMHead`).
        """
        seq = tokens.shape[1]  # before the embedding, which sequence parallelism shards
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        return self.forward_embeddings(h, position_ids, document_ids, seq_len=seq, cache=cache, labels=labels)

    def forward_embeddings(self, h_bsd: torch.Tensor, position_ids: torch.Tensor | None = None,
                           document_ids: torch.Tensor | None = None, seq_len: int | None = None,
                           cache: KVCache | None = None, last_position_only: bool = False,
                           labels: torch.Tensor | None = None) -> torch.Tensor:
        """Run the blocks, final norm and output layer on input embeddings h [B, S, D].

        Used by models that build the input embeddings themselves (a vision-language model
        scatters image embeddings into the token embeddings). `seq_len` is the full sequence
        length when `h_bsd` is already sharded on the sequence (default: h_bsd.shape[1]).

        `cache` (inference, `titanmm.models.kv_cache.KVCache`): the S new tokens are appended to
        the cache after what it already holds and attend to all of it (respecting its padding
        mask); `position_ids` must then be given and `document_ids` must be None.

        `last_position_only` (generation's prefill): the final norm and output layer run on the last
        position alone, logits [B, 1, V] (a prompt's other logits are never read).

        `labels` [B, S] (training): the summed token cross-entropy (float32 scalar) instead of the logits,
        computed by the output layer chunk by chunk (`LMHead`).
        """
        seq = h_bsd.shape[1] if seq_len is None else seq_len
        if cache is not None:
            if document_ids is not None or position_ids is None:
                raise ValueError("a KV cache needs explicit position_ids and no document_ids")
            mask = cache.attention_mask(h_bsd.shape[1])
        else:
            if seq > self.args.max_seq_len:
                raise ValueError(f"sequence length {seq} exceeds the model's max_seq_len={self.args.max_seq_len}")
            mask = document_mask(document_ids) if document_ids is not None else None
        rope = self.rope_cache[:seq].unsqueeze(0) if position_ids is None else self.rope_cache[position_ids]
        h = h_bsd
        for index, layer in enumerate(self.layers.values()):
            h = layer(h, rope, mask, cache=cache.layer(index) if cache is not None else None)
        if cache is not None:
            cache.advance(h_bsd.shape[1])
        if last_position_only:
            h = h[:, -1:]
        h = self.norm(h) if self.norm is not None else h
        if self.output is None:
            return h
        return self.output(h) if labels is None else self.output(h, labels=labels)

    @contextlib.contextmanager
    def fused_projections(self):
        """Inside (inference): every block with plain-tensor weights projects q, k and v in one matmul, and w1 and
        w3 in another (`titanmm.models.fused_linears`; the weights become views of the fused ones, fused again
        where one was replaced since). Passes that record gradients, and every pass outside, run the separate
        projections, so a weight replaced later is never read stale from a fused tensor."""
        modules = [module for layer in self.layers.values() for module in (layer.attention, layer.feed_forward)
                   if not any(isinstance(p, DTensor) for p in module.parameters())]
        for module in modules:
            module.fuse_projections()
            module.use_fused_projections = True
        try:
            yield
        finally:
            for module in modules:
                module.use_fused_projections = False

    def tie_weights(self) -> None:
        """Re-share the embedding with the output layer (moving or sharding parameters unties them)."""
        if self.args.tie_word_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, seed: int = 0, buffer_device: torch.device | None = None) -> None:
        """Deterministic initialisation; also rebuilds the RoPE table (needed after meta-device init)."""
        device = buffer_device if buffer_device is not None else self.rope_cache.device
        self.tie_weights()
        self.rope_cache = self._rope_cache(device=device)
        std = 0.02
        for name, param in self.named_parameters():
            init.fill_(param, name, seed, self._init_fn(name, std))

    def _init_fn(self, name: str, std: float) -> init.InitFn:
        name = init.canonical_name(name)
        if name.endswith("norm.weight"):
            return init.constant(1.0)
        if name.endswith(".bias"):
            return init.constant(0.0)
        if name == "tok_embeddings.weight":
            return init.normal(1.0) if not self.args.tie_word_embeddings else init.normal(std)
        if name == "output.weight":
            return init.trunc_normal(self.args.dim**-0.5, cutoff=3.0)
        layer_id = int(name.split(".")[1])
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")):
            return init.trunc_normal(init.depth_scaled_std(std, layer_id))
        return init.trunc_normal(std)
