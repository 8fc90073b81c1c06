"""Published shapes of the Llama-family models, and tiny ones for tests."""

from titanmm.models.llama.args import RopeScaling, TransformerArgs

_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001)
_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
_LLAMA32_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
_QWEN2 = dict(vocab_size=152064, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, bos_token_id=None,
              eos_token_id=151643)

LLAMA_FLAVORS: dict[str, TransformerArgs] = {
    "llama3_8b": TransformerArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336,
                                 max_seq_len=8192, **_LLAMA3),
    "llama3_70b": TransformerArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden_dim=28672,
                                  max_seq_len=8192, **_LLAMA3),
    "llama3.1_8b": TransformerArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336,
                                   rope_scaling=_LLAMA31_SCALING, max_seq_len=131072, **_LLAMA3),
    "llama3.1_70b": TransformerArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden_dim=28672,
                                    rope_scaling=_LLAMA31_SCALING, max_seq_len=131072, **_LLAMA3),
    "llama3.2_1b": TransformerArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64, ffn_hidden_dim=8192,
                                   rope_scaling=_LLAMA32_SCALING, max_seq_len=131072, tie_word_embeddings=True,
                                   **_LLAMA3),
    "llama3.2_3b": TransformerArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, head_dim=128,
                                   ffn_hidden_dim=8192, rope_scaling=_LLAMA32_SCALING, max_seq_len=131072,
                                   tie_word_embeddings=True, **_LLAMA3),
    "mistral_7b": TransformerArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336,
                                  vocab_size=32768, rope_theta=1000000.0, norm_eps=1e-5, max_seq_len=32768,
                                  bos_token_id=1, eos_token_id=2),
    "yi_34b": TransformerArgs(dim=7168, n_layers=60, n_heads=56, n_kv_heads=8, ffn_hidden_dim=20480,
                              vocab_size=64000, rope_theta=5000000.0, norm_eps=1e-5, max_seq_len=4096,
                              bos_token_id=1, eos_token_id=2),
    "qwen2_72b": TransformerArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden_dim=29568,
                                 max_seq_len=32768, **_QWEN2),
    "qwen2.5_7b": TransformerArgs(dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_hidden_dim=18944,
                                  max_seq_len=32768, **_QWEN2),
    # Tiny models for tests and the CPU demo. The vocabulary matches the tokenizer that ships in
    # titanmm/assets/tokenizer (2048 tokens).
    "debug": TransformerArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden_dim=768, vocab_size=2048,
                             rope_theta=10000.0, max_seq_len=2048, bos_token_id=1, eos_token_id=2),
    "debug_llama3.1": TransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=192,
                                      vocab_size=2048, rope_theta=500000.0, max_seq_len=512,
                                      rope_scaling=RopeScaling(factor=8.0, original_max_position=64),
                                      bos_token_id=1, eos_token_id=2),
    # The language model of `python -m titanmm.demo` (demo_vlm): half the debug model's width, so the whole
    # demo trains in minutes on a laptop CPU.
    "demo_lm": TransformerArgs(dim=128, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden_dim=384, vocab_size=2048,
                               rope_theta=10000.0, max_seq_len=512, bos_token_id=1, eos_token_id=2),
    "debug_qwen2": TransformerArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden_dim=160, vocab_size=2048,
                                   rope_theta=1000000.0, norm_eps=1e-6, max_seq_len=512, qkv_bias=True,
                                   tie_word_embeddings=True, bos_token_id=None, eos_token_id=2),
}
