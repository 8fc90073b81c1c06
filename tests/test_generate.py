"""KV-cache generation: parity with transformers' generate, cached vs full logits, sampling, fixed steps, CLI,
tensor-parallel CLI."""

from __future__ import annotations

import pytest
import torch
import transformers

from titanmm.checkpoint.hf_mapping import args_from_hf_config, hf_to_titanmm_state_dict
from titanmm.generate import GenerationConfig, generate, select_next_tokens
from titanmm.models.kv_cache import KVCache
from titanmm.models.llama import Transformer
from tests.converters.hf_models import hf_model, relative_error

PROMPT_LENGTHS = (7, 3, 12)


def _titanmm_from_hf(reference) -> Transformer:
    args = args_from_hf_config(reference.config.to_dict())
    model = Transformer(args)
    model.load_state_dict(hf_to_titanmm_state_dict(reference.state_dict(), args), strict=True)
    return model.float().eval()


def _prompts(lengths=PROMPT_LENGTHS, vocab: int = 300, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


def _hf_generate(reference, prompts, pad_id: int = 0, **kwargs) -> list[list[int]]:
    seq = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), seq), pad_id)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, seq - len(p):] = torch.tensor(p)
        mask[row, seq - len(p):] = 1
    with torch.no_grad():
        out = reference.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=20,
                                 pad_token_id=pad_id, **kwargs)
    eos = reference.generation_config.eos_token_id
    return [_until_eos(row[seq:].tolist(), eos) for row in out]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def models(request):
    reference = hf_model(request.param)
    return reference, _titanmm_from_hf(reference)


@pytest.mark.parametrize("lengths", [PROMPT_LENGTHS, (9,)])
def test_greedy_matches_hf_generate(models, lengths):
    reference, model = models
    prompts = _prompts(lengths)
    expected = _hf_generate(reference, prompts)
    out = generate(model, prompts, max_new_tokens=20, eos_token_ids=[reference.generation_config.eos_token_id])
    assert out.token_ids == expected
    assert all(len(ids) == 20 or reason == "eos" for ids, reason in zip(out.token_ids, out.finish_reasons))


def test_cached_logits_equal_full_forward(models):
    """Prefill + one-token decode steps on a left-padded batch give each row's full-sequence logits."""
    _, model = models
    sequences = _prompts((10, 6, 14), seed=5)
    prompt_lengths = (4, 2, 9)
    batch = len(sequences)
    # Left-pad the prompts; the rest of each sequence is fed one token per step.
    seq = max(prompt_lengths)
    ids = torch.zeros(batch, seq, dtype=torch.long)
    mask = torch.zeros(batch, seq, dtype=torch.long)
    for row, (s, n) in enumerate(zip(sequences, prompt_lengths)):
        ids[row, seq - n:] = torch.tensor(s[:n])
        mask[row, seq - n:] = 1
    steps = max(len(s) - n for s, n in zip(sequences, prompt_lengths))
    cache = KVCache.for_model(model, batch, seq + steps)
    cache.set_padding(mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(ids, positions, cache=cache)
        got = [[logits[row, seq - n + i] for i in range(n)] for row, n in enumerate(prompt_lengths)]
        pos = positions[:, -1:] + 1
        for step in range(steps):
            tokens = torch.tensor([[s[n + step] if n + step < len(s) else 0]
                                   for s, n in zip(sequences, prompt_lengths)])
            logits = model(tokens, pos, cache=cache)
            for row, (s, n) in enumerate(zip(sequences, prompt_lengths)):
                if n + step < len(s):
                    got[row].append(logits[row, 0])
            pos = pos + 1
        for row, s in enumerate(sequences):
            full = model(torch.tensor([s]))[0]
            assert relative_error(full, torch.stack(got[row])) <= 1e-5


def test_sampling_is_seeded_and_filters():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    cfg = GenerationConfig(temperature=0.8, top_k=5, seed=1)
    draws = torch.stack([select_next_tokens(logits, cfg, torch.Generator().manual_seed(7)) for _ in range(2)])
    assert torch.equal(draws[0], draws[1])
    top5 = logits.topk(5).indices
    for _ in range(20):
        tok = select_next_tokens(logits, cfg, torch.Generator().manual_seed(_))
        assert all(t in top5[r] for r, t in enumerate(tok.tolist()))
    # top_p tiny: only the argmax survives.
    tok = select_next_tokens(logits, GenerationConfig(temperature=1.0, top_p=1e-6), torch.Generator().manual_seed(0))
    assert torch.equal(tok, logits.argmax(-1))


def test_sampled_generation_is_reproducible_and_eos_stops(models):
    _, model = models
    prompts = _prompts()
    a = generate(model, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=4)
    b = generate(model, prompts, max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=4)
    assert a.token_ids == b.token_ids and all(len(t) == 8 for t in a.token_ids)
    # Make the first greedy token of row 0 an EOS: that row stops after one token, the others go on.
    first = generate(model, prompts, max_new_tokens=1).token_ids
    out = generate(model, prompts, max_new_tokens=6, eos_token_ids=[first[0][0]])
    assert out.token_ids[0] == [first[0][0]] and out.finish_reasons[0] == "eos"


class _CharTokenizer:
    bos_id, eos_id, pad_id = None, None, None

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings(models):
    _, model = models
    prompts = _prompts()
    tok = _CharTokenizer()
    full = generate(model, prompts, max_new_tokens=10, tokenizer=tok)
    stop = full.texts[1][3:5]
    out = generate(model, prompts, max_new_tokens=10, tokenizer=tok, stop_strings=[stop])
    assert out.finish_reasons[1] == "stop_string"
    assert out.texts[1] == full.texts[1][:full.texts[1].find(stop)]
    assert len(out.token_ids[1]) <= 5


# ------------------------------------------------------------------------------------------------
# VLM (LLaVA) parity
# ------------------------------------------------------------------------------------------------

def test_llava_greedy_matches_hf_generate(tmp_path):
    import titanmm
    from converters import hf_vlm
    from tests.converters.test_hf_vlm import IMAGE_TOKEN, _llava

    reference = _llava("clip", "llama")
    reference.generation_config.eos_token_id = None
    reference.save_pretrained(tmp_path / "hf")
    hf_vlm.main(["--hf-dir", str(tmp_path / "hf"), "--output", str(tmp_path / "ckpt"), "--no-progress"])
    model = titanmm.load(tmp_path / "ckpt")
    per_image = (28 // 7) ** 2
    g = torch.Generator().manual_seed(2)
    prompts = []
    for n_text, n_images in ((5, 1), (2, 2)):
        ids = torch.randint(3, IMAGE_TOKEN - 1, (n_text,), generator=g).tolist()
        prompts.append(ids[:1] + [IMAGE_TOKEN] * (per_image * n_images) + ids[1:])
    pixels = torch.randn(3, 3, 28, 28, generator=g)
    seq = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), seq, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, seq - len(p):] = torch.tensor(p)
        mask[row, seq - len(p):] = 1
    with torch.no_grad():
        hf = reference.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                                max_new_tokens=20, pad_token_id=0)
    out = generate(model, prompts, pixel_values=pixels, max_new_tokens=20)
    assert out.token_ids == hf[:, seq:].tolist()


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def test_cli_on_tiny_checkpoint(tmp_path, capsys):
    from titanmm import generate as gen_module
    from titanmm.checkpoint.format import save_model
    from titanmm.data.tokenizer import build_tokenizer
    from titanmm.models.llama.args import TransformerArgs

    tokenizer = build_tokenizer("")
    args = TransformerArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=tokenizer.vocab_size,
                           ffn_hidden_dim=64, max_seq_len=256)
    model = Transformer(args)
    model.init_weights(seed=0)
    save_model(model, tmp_path / "ckpt", "llama", args, tokenizer="")
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "Hello there", "--prompt", "Hi",
            "--max-new-tokens", "5", "--device", "cpu", "--dtype", "fp32"]
    out = gen_module.main(argv + ["--raw"])
    assert len(out.token_ids) == 2 and all(1 <= len(t) <= 5 for t in out.token_ids)
    assert capsys.readouterr().out.count("\n") >= 2
    # The same greedy result as the Python API on the prompts encoded with bos.
    prompts = [tokenizer.encode(t, bos=True) for t in ("Hello there", "Hi")]
    api = generate(model, prompts, max_new_tokens=5, eos_token_ids=[tokenizer.eos_id])
    assert out.token_ids == api.token_ids
    # The shipped tokenizer has none of the chat templates' special tokens: a clear error.
    with pytest.raises(ValueError, match="chat template"):
        gen_module.main(argv + ["--chat-template", "llama3"])
    sampled = gen_module.main(argv + ["--raw", "--temperature", "0.9", "--top-p", "0.9", "--top-k", "20",
                                      "--seed", "3"])
    again = gen_module.main(argv + ["--raw", "--temperature", "0.9", "--top-p", "0.9", "--top-k", "20",
                                    "--seed", "3"])
    assert sampled.token_ids == again.token_ids


def test_fixed_steps_runs_every_decode_step(models):
    """FSDP needs the same number of forward passes on every rank: fixed_steps keeps decoding after all rows stop."""
    _, model = models
    prompts = _prompts()
    first = [ids[0] for ids in generate(model, prompts, max_new_tokens=1).token_ids]
    calls = []
    handle = model.layers["0"].register_forward_hook(lambda *_: calls.append(1))
    try:
        early = generate(model, prompts, max_new_tokens=6, eos_token_ids=first)
        assert len(calls) == 1  # the prefill only: every row ended with its first token
        calls.clear()
        fixed = generate(model, prompts, max_new_tokens=6, eos_token_ids=first, fixed_steps=True)
        assert len(calls) == 6  # prefill + 5 decode steps
    finally:
        handle.remove()
    assert fixed.token_ids == early.token_ids == [[t] for t in first]
    assert fixed.finish_reasons == ["eos"] * len(prompts)


@pytest.mark.slow
def test_tensor_parallel_cli_matches_single_process(tmp_path):
    """torchrun, 2 gloo ranks: the VLM's language model split in two gives the 1-process greedy tokens."""
    import json
    import subprocess
    import sys

    from tests.eval.benchmark_inputs import image, tiny_vlm_checkpoint
    from tests.utils import REPO, run_env
    from titanmm import generate as gen_module

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: competing OpenMP threads slow a tiny model down many times
    try:
        checkpoint = tiny_vlm_checkpoint(tmp_path / "ckpt")
        image(3, (80, 40)).save(tmp_path / "chart.png")
        argv = ["--checkpoint", str(checkpoint), "--prompt", "Hello there, what is in", "--prompt", "Hi",
                "--image", str(tmp_path / "chart.png"), "--max-new-tokens", "12", "--device", "cpu", "--dtype", "fp32"]
        single = gen_module.main(argv)
    finally:
        torch.set_num_threads(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "titanmm.generate", *argv, "--output-json", str(tmp_path / "tp2.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    tp2 = json.loads((tmp_path / "tp2.json").read_text())
    assert tp2["token_ids"] == single.token_ids and tp2["texts"] == single.texts
