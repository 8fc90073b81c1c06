"""A static key/value cache for batched autoregressive decoding.

Every layer gets `k`, `v` buffers [B, kv_heads, max_len, head_dim], allocated once, at the first write
(with the head count, dtype and device of the keys written: under tensor parallelism a rank holds only
its own heads, under mixed precision the compute dtype). All rows of the
batch share one write pointer `length`: a forward pass over S new tokens writes them into slots
[length, length + S) of every row and then moves the pointer on. Prompts of different lengths are
therefore *left*-padded so that they all end in the same slot; `key_valid` [B, max_len] marks the
padding slots, which no query may attend to.

The attention mask of a pass (built once, shared by all layers) lets the query in slot i of row b
see key slot j when j <= i and `key_valid[b, j]`, and always its own slot: a padding query then
attends only to itself, so no row of the softmax is empty (no NaN), while real queries never see
padding. Only the filled part of the buffers ([:length + S]) is handed to attention.

Static mode (`make_static`, for a compiled / CUDA-graph decode step): every pass is one token per row,
written at slot `slot`, a device tensor [1] that each pass moves on in place; attention reads the
whole [B, kv_heads, max_len, head_dim] buffers under the mask [B, 1, 1, max_len] =
`key_valid & (key slot <= slot)` (the slots after the prompt are valid: a query always sees its own).
The shapes are then the same at every step and no Python number changes: a compiled step neither
recompiles nor syncs with the host. The write pointer `length` stays where static mode began; the
caller keeps the slot below `max_len` (there is no host-side check in this mode).
"""

from __future__ import annotations

import torch


class LayerKVCache:
    """One layer's view of a `KVCache`: `update` writes the new keys / values and returns the filled part."""

    def __init__(self, cache: "KVCache", index: int):
        self.cache = cache
        self.index = index

    def update(self, k_bhsd: torch.Tensor, v_bhsd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        if c.static:  # one token per row, at the device-side slot; attention reads every slot
            k_buf, v_buf = c.k[self.index], c.v[self.index]
            k_buf.index_copy_(2, c.slot, k_bhsd.to(k_buf.dtype))
            v_buf.index_copy_(2, c.slot, v_bhsd.to(v_buf.dtype))
            return k_buf, v_buf
        start, end = c.length, c.length + k_bhsd.shape[2]
        if c.k[self.index] is None:
            c.allocate(self.index, k_bhsd)
        k_buf, v_buf = c.k[self.index], c.v[self.index]
        k_buf[:, :, start:end] = k_bhsd.to(k_buf.dtype)
        v_buf[:, :, start:end] = v_bhsd.to(v_buf.dtype)
        return k_buf[:, :, :end], v_buf[:, :, :end]


class KVCache:
    """Keys / values of all layers for `batch` rows of up to `max_len` tokens.

    `dtype` None: the dtype of the keys written (the model's compute dtype).
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu"):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.batch = batch
        self.max_len = max_len
        self.dtype = dtype
        self.length = 0
        self.static = False
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        """Static mode: the slot the next pass writes (moved on in place by each pass)."""

    @classmethod
    def for_model(cls, lm, batch: int, max_len: int, dtype: torch.dtype | None = None) -> "KVCache":
        """A cache for a `titanmm.models.llama.Transformer`, on the device of its weights."""
        if max_len > lm.args.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model's max_seq_len={lm.args.max_seq_len}")
        return cls(len(lm.layers), batch, max_len, dtype, lm.tok_embeddings.weight.device)

    def allocate(self, index: int, k_bhsd: torch.Tensor) -> None:
        """Layer `index`'s buffers, shaped after its first keys [B, kv_heads, S, head_dim]."""
        _, heads, _, head_dim = k_bhsd.shape
        self.allocate_layer(index, heads, head_dim, self.dtype or k_bhsd.dtype, k_bhsd.device)

    def allocate_layer(self, index: int, heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        """Layer `index`'s buffers [B, heads, max_len, head_dim], before any keys are written (a compiled
        prefill then always finds them allocated)."""
        shape = (self.batch, heads, self.max_len, head_dim)
        self.k[index] = torch.zeros(shape, dtype=dtype, device=device)
        self.v[index] = torch.zeros(shape, dtype=dtype, device=device)

    def layer(self, index: int) -> LayerKVCache:
        return LayerKVCache(self, index)

    def set_padding(self, attention_mask_bs: torch.Tensor) -> None:
        """Mark which of the next S slots hold real tokens (attention_mask [B, S], 1 = token, 0 = padding)."""
        seq = attention_mask_bs.shape[1]
        if self.static:
            raise ValueError("set_padding is for the prompt pass, before static mode")
        self._check_room(seq)
        self.key_valid[:, self.length:self.length + seq] = attention_mask_bs.to(torch.bool)

    def make_static(self) -> None:
        """Decode from here on in static mode (see the module docstring), from slot `length`.

        Every layer must already hold keys (a prefill ran). `reset` returns to the dynamic mode."""
        if any(k is None for k in self.k):
            raise ValueError("static mode needs every layer's buffers: run a prefill pass first")
        self._check_room(1)
        self.slot.fill_(self.length)
        self.static = True
        from torch import _dynamo

        # The buffers keep their addresses from step to step: CUDA graphs may write them in place.
        for tensor in (self.slot, self.key_valid, *self.k, *self.v):
            _dynamo.mark_static_address(tensor, guard=False)

    def attention_mask(self, seq: int) -> torch.Tensor:
        """Boolean mask [B, 1, seq, length + seq] for a pass over `seq` new tokens (see the module docstring);
        in static mode [B, 1, 1, max_len]."""
        if self.static:
            if seq != 1:
                raise ValueError(f"a static-mode KV cache takes one token per row and pass, got {seq}")
            key_slot = torch.arange(self.key_valid.shape[1], device=self.key_valid.device)
            return (self.key_valid & (key_slot <= self.slot)[None])[:, None, None]
        self._check_room(seq)
        start, end = self.length, self.length + seq
        device = self.key_valid.device
        query_slot = torch.arange(start, end, device=device)[:, None]
        key_slot = torch.arange(end, device=device)[None, :]
        causal = key_slot <= query_slot  # [seq, end]
        allowed = causal[None] & self.key_valid[:, None, :end]
        allowed = allowed | (key_slot == query_slot)[None]
        return allowed[:, None]

    def advance(self, seq: int) -> None:
        if self.static:
            self.slot.add_(seq)
        else:
            self.length += seq

    def reset(self) -> None:
        """Empty the cache (the buffers are kept, for a new batch of the same shape) and leave static mode."""
        self.length = 0
        self.static = False
        self.key_valid.fill_(True)

    def _check_room(self, seq: int) -> None:
        if self.length + seq > self.max_len:
            raise ValueError(f"KV cache overflow: {self.length} + {seq} tokens > max_len={self.max_len}")
