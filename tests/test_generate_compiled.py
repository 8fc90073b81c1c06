"""Compiled decoding (`GenerationConfig.compile`): the static-mode KV cache, compiled tokens == eager tokens
(LM batch of different prompt lengths, EOS / stop strings / fixed steps, sampling, VLM), no recompiles."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from titanmm.generate import GenerationConfig, generate, release_decode_buffers
from titanmm.models.kv_cache import KVCache
from titanmm.models.llama import LLAMA_FLAVORS, Transformer
from tests.converters.hf_models import relative_error

# The debug flavor, also debug_vlm's language model: the VLM's decode step is the same graph (the compiled
# kernels are reused, which keeps the test short even with a cold inductor cache).
ARGS = LLAMA_FLAVORS["debug"]
PROMPT_LENGTHS = (7, 3, 12)


def _prompts(lengths=PROMPT_LENGTHS, vocab: int = 2000, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: competing OpenMP threads slow a tiny model down many times
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm():
    torch._dynamo.reset()
    model = Transformer(ARGS)
    model.init_weights(seed=0)
    yield model.eval()
    release_decode_buffers(model)
    torch._dynamo.reset()


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_static_cache_logits_equal_dynamic(lm):
    """Prefill, then one-token steps: the static mode (write at a device-side slot, attend over all max_len slots
    under a mask) gives the dynamic mode's logits, with every step's shapes the same."""
    prompts = _prompts()
    batch, seq = len(prompts), max(PROMPT_LENGTHS)
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, seq - len(p):] = torch.tensor(p)
        mask[row, seq - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    feed = torch.randint(3, 2000, (8, batch, 1), generator=torch.Generator().manual_seed(1))
    results = {}
    with torch.inference_mode():
        for static in (False, True):
            cache = KVCache.for_model(lm, batch, 64)
            cache.set_padding(mask)
            logits = [lm(ids, positions, cache=cache)[:, -1]]
            if static:
                cache.make_static()
            pos = positions[:, -1:] + 1
            shapes = set()
            for tokens in feed:
                logits.append(lm(tokens, pos, cache=cache)[:, -1])
                shapes.add(tuple(cache.attention_mask(1).shape) if static else None)
                pos = pos + 1
            results[static] = torch.stack(logits)
            if static:
                assert shapes == {(batch, 1, 1, 64)}
                assert cache.slot.item() == seq + len(feed) and cache.length == seq
    assert relative_error(results[False], results[True]) <= 1e-5


class _CharTokenizer:
    bos_id, eos_id, pad_id = None, None, None

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_compiled_greedy_matches_eager_without_recompiles(lm):
    prompts = _prompts()
    counters.clear()
    eager = generate(lm, prompts, max_new_tokens=16)
    compiled = generate(lm, prompts, max_new_tokens=16, compile=True)
    assert compiled.token_ids == eager.token_ids and all(len(t) == 16 for t in compiled.token_ids)
    assert _graphs() == 2  # one graph for all 15 decode steps, one for the prefill (dynamic shapes)
    # EOS, fixed steps and stop strings: the same shapes, so the same compiled step, never recompiled.
    tok = _CharTokenizer()
    stop = tok.decode(eager.token_ids[2][5:7])
    cases = [dict(eos_token_ids=[eager.token_ids[1][4]]),
             dict(eos_token_ids=[eager.token_ids[0][0], eager.token_ids[2][9]], fixed_steps=True),
             dict(eos_token_ids=[eager.token_ids[0][0], eager.token_ids[1][0], eager.token_ids[2][0]]),
             dict(tokenizer=tok, stop_strings=[stop])]
    reasons = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for kwargs in cases:
            want = generate(lm, prompts, max_new_tokens=16, **kwargs)
            got = generate(lm, prompts, config=GenerationConfig(max_new_tokens=16, compile=True), **kwargs)
            assert (got.token_ids, got.finish_reasons, got.texts) == (want.token_ids, want.finish_reasons, want.texts)
            reasons.update(want.finish_reasons)
    assert _graphs() == 2
    assert reasons == {"eos", "stop_string", "length"}


def test_compiled_prefill_serves_every_shape(lm):
    """compile_prefill (the default with compile): the prefill is compiled once, with dynamic shapes (a second
    batch size and prompt length add only the decode step's recompile; fresh and reused KV buffers the same
    graph), and the tokens stay the eager loop's; compile_prefill=False keeps the prefill eager."""
    counters.clear()
    prompts = _prompts()
    eager = generate(lm, prompts, max_new_tokens=4)
    release_decode_buffers(lm)  # fresh buffers for the first compiled call, reused by the second
    assert generate(lm, prompts, max_new_tokens=4, compile=True, compile_prefill=True).token_ids == eager.token_ids
    graphs = _graphs()
    assert generate(lm, prompts, max_new_tokens=4, compile=True, compile_prefill=True).token_ids == eager.token_ids
    assert _graphs() == graphs
    prompts = _prompts(lengths=(30, 9), seed=5)
    eager = generate(lm, prompts, max_new_tokens=6)
    compiled = generate(lm, prompts, max_new_tokens=6, compile=True, compile_prefill=True)
    assert compiled.token_ids == eager.token_ids
    assert _graphs() == graphs + 1
    counters.clear()
    torch._dynamo.reset()
    eager_prefill = generate(lm, prompts, max_new_tokens=6, compile=True, compile_prefill=False)
    assert eager_prefill.token_ids == eager.token_ids
    assert _graphs() == 1  # the decode step only


def test_compiled_sampling_is_seeded_like_eager(lm):
    prompts = _prompts()
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=4)
    eager = generate(lm, prompts, **kwargs)
    first = generate(lm, prompts, compile=True, **kwargs)
    again = generate(lm, prompts, compile=True, **kwargs)
    assert first.token_ids == again.token_ids == eager.token_ids


def test_compiled_vlm_greedy_matches_eager():
    from titanmm.models import get_model_spec

    torch._dynamo.reset()
    spec = get_model_spec("vlm")
    args = spec.flavors["debug_vlm"]
    model = spec.model_cls(args)
    model.init_weights(seed=0)
    model.eval()
    tile = args.image.tile_size
    per_tile = model.tokens_per_tile(tile, tile)
    g = torch.Generator().manual_seed(2)
    prompts = []
    for n_text, n_tiles in ((5, 1), (2, 2), (9, 0)):
        ids = torch.randint(3, args.image_token_id - 1, (n_text,), generator=g).tolist()
        prompts.append(ids[:1] + [args.image_token_id] * (per_tile * n_tiles) + ids[1:])
    pixels = torch.randn(3, 3, tile, tile, generator=g)  # 1 + 2 tiles
    eager = generate(model, prompts, pixel_values=pixels, max_new_tokens=12)
    compiled = generate(model, prompts, pixel_values=pixels, max_new_tokens=12, compile=True)
    assert compiled.token_ids == eager.token_ids
    release_decode_buffers(model)
    torch._dynamo.reset()


def test_cli_compile_flag(tmp_path, monkeypatch):
    from titanmm import generate as gen_module
    from titanmm.checkpoint.format import save_model
    from titanmm.models.llama.args import TransformerArgs

    args = TransformerArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=2048,
                           ffn_hidden_dim=64, max_seq_len=256)
    model = Transformer(args)
    model.init_weights(seed=0)
    save_model(model, tmp_path / "ckpt", "llama", args, tokenizer="")
    seen = []

    def fake_generate(model, prompts, *, config, **kwargs):
        seen.append(config)
        return gen_module.GenerationOutput([[] for _ in prompts], ["length"] * len(prompts), ["" for _ in prompts])

    monkeypatch.setattr(gen_module, "generate", fake_generate)
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "Hi", "--device", "cpu", "--dtype", "fp32", "--raw"]
    gen_module.main(argv)
    gen_module.main(argv + ["--compile"])
    assert [c.compile for c in seen] == [False, True]
