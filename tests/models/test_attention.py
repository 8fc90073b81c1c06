"""titanmm.models.attention: the one-query grouped-query path used when decoding with a KV cache."""

import pytest
import torch
import torch.nn.functional as F

from titanmm.models.attention import causal_attention


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (32, 8), (4, 1)])
def test_one_query_gqa_equals_enable_gqa(heads, kv_heads):
    torch.manual_seed(0)
    batch, slots, head_dim = 3, 37, 16
    q = torch.randn(batch, heads, 1, head_dim, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, slots, head_dim, dtype=torch.float64)
    v = torch.randn(batch, kv_heads, slots, head_dim, dtype=torch.float64)
    key_valid = torch.rand(batch, 1, 1, slots) > 0.3  # left padding and the like, per row
    key_valid[..., -1] = True  # a query always sees its own slot
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid, enable_gqa=True)
    torch.testing.assert_close(causal_attention(q, k, v, key_valid), expected, rtol=1e-12, atol=1e-12)
    # a query laid out as the model makes it ([B, 1, H, D] transposed) gives the same
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(causal_attention(q_strided, k, v, key_valid), expected, rtol=1e-12, atol=1e-12)
