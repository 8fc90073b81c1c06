"""The Llama-family decoder: logits against transformers, document masking, initialisation."""

import pytest
import torch
import transformers

from titanmm.checkpoint.hf_mapping import args_from_hf_config, hf_to_titanmm_state_dict
from titanmm.models.fused_linears import still_fused
from titanmm.models.llama import LLAMA_FLAVORS, Transformer, TransformerArgs


def _rel_err(a, b):
    return ((a - b).norm() / a.norm()).item()


HF_CONFIGS = {
    "llama3.1": (transformers.LlamaConfig, dict(
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "mistral": (transformers.MistralConfig, dict(rope_theta=1000000.0, sliding_window=None)),
    "qwen2": (transformers.Qwen2Config, dict(rope_theta=1000000.0, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("family", sorted(HF_CONFIGS))
def test_logits_match_transformers(family):
    config_cls, extra = HF_CONFIGS[family]
    torch.manual_seed(0)
    hf_config = config_cls(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           rms_norm_eps=1e-5, **extra)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    args = args_from_hf_config(hf_config.to_dict())
    model = Transformer(args).eval()
    model.load_state_dict(hf_to_titanmm_state_dict(hf.state_dict(), args), strict=True)
    ids = torch.randint(0, 320, (2, 100))
    with torch.no_grad():
        assert _rel_err(hf(ids).logits, model(ids)) <= 1e-5


def test_packed_documents_do_not_see_each_other():
    torch.manual_seed(0)
    model = Transformer(LLAMA_FLAVORS["debug_llama3.1"]).eval()
    model.init_weights(seed=1)
    ids = torch.randint(3, 2048, (1, 48))
    doc = torch.tensor([[0] * 20 + [1] * 16 + [2] * 12])
    pos = torch.cat([torch.arange(20), torch.arange(16), torch.arange(12)])[None]
    changed = ids.clone()
    changed[0, 20:36] = torch.randint(3, 2048, (16,))  # replace the middle document
    with torch.no_grad():
        a = model(ids, position_ids=pos, document_ids=doc)
        b = model(changed, position_ids=pos, document_ids=doc)
        alone = model(ids[:, 36:])  # the last document on its own
    assert torch.equal(a[:, :20], b[:, :20]) and torch.equal(a[:, 36:], b[:, 36:])
    assert not torch.allclose(a[:, 20:36], b[:, 20:36])
    assert _rel_err(alone, a[:, 36:]) < 1e-5


def test_init_is_deterministic_and_seed_dependent():
    args = LLAMA_FLAVORS["debug_qwen2"]
    m1, m2, m3 = Transformer(args), Transformer(args), Transformer(args)
    m1.init_weights(seed=5)
    m2.init_weights(seed=5)
    m3.init_weights(seed=6)
    for (name, p1), p2, p3 in zip(m1.named_parameters(), m2.parameters(), m3.parameters()):
        assert torch.equal(p1, p2), name
        if "norm" not in name and "bias" not in name:
            assert not torch.equal(p1, p3), name
    assert m1.output.weight is m1.tok_embeddings.weight


def test_too_long_sequence_is_rejected():
    model = Transformer(TransformerArgs(dim=32, n_layers=1, n_heads=2, ffn_hidden_dim=64, vocab_size=64,
                                        max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("flavor", sorted(LLAMA_FLAVORS))
def test_flavor_parameter_counts(flavor):
    args = LLAMA_FLAVORS[flavor]
    with torch.device("meta"):
        model = Transformer(args)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == args.num_params()


def test_published_sizes():
    billions = {k: LLAMA_FLAVORS[k].num_params() / 1e9 for k in ("llama3_8b", "llama3_70b", "mistral_7b",
                                                                  "yi_34b", "qwen2_72b", "qwen2.5_7b")}
    assert abs(billions["llama3_8b"] - 8.03) < 0.01
    assert abs(billions["llama3_70b"] - 70.55) < 0.01
    assert abs(billions["mistral_7b"] - 7.25) < 0.01
    assert abs(billions["yi_34b"] - 34.39) < 0.01
    assert abs(billions["qwen2_72b"] - 72.71) < 0.01
    assert abs(billions["qwen2.5_7b"] - 7.62) < 0.01


@pytest.mark.parametrize("flavor", ["debug_llama3.1", "debug_qwen2"])  # Qwen2: with q/k/v biases
def test_fused_projections(flavor):
    """fused_projections (inference): q/k/v and w1/w3 each in one matmul, the same logits without gradients;
    the weights stay the same Parameter objects (views of the fused ones: an in-place update reaches both), the
    state dict is unchanged, passes with gradients still reach every weight, and a weight replaced later is never
    read stale."""
    torch.manual_seed(0)
    model = Transformer(LLAMA_FLAVORS[flavor]).to(torch.float64)
    model.init_weights(seed=1)
    ids = torch.randint(3, 2048, (2, 24))
    with torch.no_grad():
        expected = model(ids)
    params_before = dict(model.named_parameters())
    keys_before = list(model.state_dict())
    attention, feed_forward = model.layers["0"].attention, model.layers["0"].feed_forward
    qkv, w13 = (attention.wq, attention.wk, attention.wv), (feed_forward.w1, feed_forward.w3)

    def both_fused() -> bool:
        return (still_fused(qkv, attention.wqkv_weight, attention.wqkv_bias)
                and still_fused(w13, feed_forward.w13_weight))

    with model.fused_projections():
        with torch.inference_mode():  # as in generate
            torch.testing.assert_close(model(ids), expected, rtol=1e-12, atol=1e-12)
        assert both_fused()
        assert not attention.wqkv_weight.is_inference() and not feed_forward.w13_weight.is_inference()
        assert all(p is params_before[n] for n, p in model.named_parameters())
        assert list(model.state_dict()) == keys_before
        with torch.no_grad():
            attention.wk.weight.mul_(0.5)  # e.g. an optimizer step
            feed_forward.w3.weight.mul_(0.5)
            fused_after_update = model(ids)
        logits = model(ids)  # with gradients: the separate projections, the same numbers
        torch.testing.assert_close(logits.detach(), fused_after_update, rtol=1e-12, atol=1e-12)
        logits.logsumexp(-1).mean().backward()
        assert all(linear.weight.grad.abs().sum() > 0 for linear in qkv + w13)
    assert not attention.use_fused_projections and not feed_forward.use_fused_projections
    replaced = {"layers.0.attention.wk.weight": torch.randn_like(attention.wk.weight),
                "layers.0.feed_forward.w1.weight": torch.randn_like(feed_forward.w1.weight)}
    model.load_state_dict(replaced, strict=False, assign=True)  # sharing ends
    assert not still_fused(qkv, attention.wqkv_weight, attention.wqkv_bias)
    assert not still_fused(w13, feed_forward.w13_weight)
    with torch.no_grad():
        unfused = model(ids)  # outside the context: the new weights, whatever the fused tensors hold
        with model.fused_projections():
            assert both_fused()  # fused again on entry
            torch.testing.assert_close(model(ids), unfused, rtol=1e-12, atol=1e-12)
    if attention.wq.bias is not None:  # a replaced bias alone ends the sharing too
        model.load_state_dict({"layers.0.attention.wv.bias": torch.randn_like(attention.wv.bias)}, strict=False,
                              assign=True)
        assert not still_fused(qkv, attention.wqkv_weight, attention.wqkv_bias)
        with torch.no_grad():
            unfused = model(ids)
            with model.fused_projections():
                torch.testing.assert_close(model(ids), unfused, rtol=1e-12, atol=1e-12)
