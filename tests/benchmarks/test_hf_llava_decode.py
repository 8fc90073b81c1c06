"""benchmarks/hf_llava_decode.py (transformers' LLaVA generate, the peer of `decode_llava_mistral_clip336`) with
--tiny on the CPU, its result line read by compare.py's parser; and compare.py's plan and summary of that workload
from canned outputs (no GPU)."""

from __future__ import annotations

import json

import pytest

from tests.utils import load_benchmark

H100 = "NVIDIA H100 80GB HBM3"
NAME = "decode_llava_mistral_clip336"

compare, hf_llava_decode = load_benchmark("compare"), load_benchmark("hf_llava_decode")
W = compare.WORKLOADS[NAME]


@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_peer_prints_a_line_compare_reads(batch, capsys):
    assert hf_llava_decode.main(["--tiny", "--device", "cpu", "--batch", str(batch), "--prompt-len", "5",
                                 "--new-tokens", "4", "--warmup", "1", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    cfg = hf_llava_decode.build_config(tiny=True)
    per_image = hf_llava_decode.image_tokens(cfg)
    assert f"bos + {per_image} image tokens + 5 text tokens = {1 + per_image + 5} tokens" in out
    parsed = compare.parse_hf_decode(out)
    assert parsed["model"] == "llava-mistral-7B" and parsed["mode"] == "default" and parsed["batch"] == batch
    assert parsed["new_tokens"] == 4 and parsed["new_tokens_per_s"] > 0 and parsed["seconds_per_call"] > 0
    assert "peak_mem_gib" not in parsed  # "peak n/a" on the CPU


def test_full_config_matches_bench_hf_llava():
    cfg = hf_llava_decode.build_config()
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.image_size, vc.patch_size) == (1024, 24, 336, 14)
    assert (tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, tc.num_key_value_heads, tc.vocab_size) == (
        4096, 14336, 32, 8, 32768)
    assert cfg.image_token_id == 32000 and cfg.vision_feature_layer == -2
    assert hf_llava_decode.image_tokens(cfg) == 576 == compare.decode_image_tokens(W)
    ids, mask, pixels = hf_llava_decode.make_inputs(cfg, 2, 128, "cpu", hf_llava_decode.torch.bfloat16)
    assert ids.shape == mask.shape == (2, 1 + 576 + 128) and pixels.shape == (2, 3, 336, 336)
    assert (ids == 32000).sum(dim=1).tolist() == [576, 576] and ids[:, 0].tolist() == [1, 1]


def test_parse_hf_decode_reads_the_peak():
    line = "HF generate llava-mistral-7B default B=32: 1,234.5 new tok/s (3.32 s per call of 128 tokens), peak 20.1 GiB"
    assert compare.parse_hf_decode(line) == {"model": "llava-mistral-7B", "mode": "default", "batch": 32,
                                             "new_tokens_per_s": 1234.5, "seconds_per_call": 3.32,
                                             "new_tokens": 128, "peak_mem_gib": 20.1}


def test_plan_runs_the_vlm_mode_and_the_repo_peer(tmp_path):
    runs = compare.plan(W, 1, 15, tmp_path)
    assert [r.side for r in runs] == ["titanmm", "peer", "peer"] and [r.batch for r in runs[1:]] == [1, 32]
    titanmm = runs[0].argv
    assert titanmm[titanmm.index("--model") + 1] == "vlm"
    assert titanmm[titanmm.index("--flavor") + 1] == compare.VLM_FLAVOR and "--compile" in titanmm
    for run, batch in zip(runs[1:], (1, 32)):
        assert run.argv[1] == "benchmarks/hf_llava_decode.py"
        assert run.argv[run.argv.index("--batch") + 1] == str(batch)
        assert run.argv[run.argv.index("--new-tokens") + 1] == "128"
        assert run.argv[run.argv.index("--prompt-len") + 1] == "128"


def test_summarize_counts_the_language_model_only():
    params, weight_bytes = compare.decode_weight_stats(W)
    lm = compare.decode_weight_stats()[0]
    assert params != lm  # Mistral 7B, not Llama 3 8B
    titanmm = {"model": "vlm", "hbm_copy_bytes_per_s": 3.0e12, "params_read": params, "weight_bytes": weight_bytes,
               "batches": {"1": {"new_tokens_per_s": 40.0, "seconds_per_call": 3.2, "peak_mem_gib": 15.5},
                           "32": {"new_tokens_per_s": 1000.0, "seconds_per_call": 4.1, "peak_mem_gib": 20.0}}}
    peer = {b: f"HF generate llava-mistral-7B default B={b}: {r} new tok/s ({s} s per call of 128 tokens), peak "
               f"{m} GiB" for b, r, s, m in ((1, 25.0, 5.12, 15.4), (32, 500.0, 8.2, 24.0))}
    outputs = {"titanmm": json.dumps(titanmm), "peer:1": peer[1], "peer:32": peer[32]}
    errors = {}
    sides, extra = compare.summarize(W, outputs, 0, H100, errors)
    assert errors == {}
    bound = 3.0e12 / weight_bytes
    assert sides["titanmm"]["bandwidth_bound_fraction"] == pytest.approx(40.0 / bound)
    assert sides["peer"]["peak_mem_gib"] == 24.0 and sides["peer"]["by_batch"]["1"]["peak_mem_gib"] == 15.4
    assert extra["ratio_by_batch"] == {"1": pytest.approx(1.6), "32": pytest.approx(2.0)}
    assert extra["flops_per_new_token"] == 2 * params
    settings = compare.settings(W, 15, 5)
    assert settings["model"] == compare.VLM_FLAVOR and settings["prompt_len"] == 1 + 576 + 128
    assert settings["image_tokens"] == 576 and settings["text_tokens"] == 128
    assert compare.settings(compare.WORKLOADS["decode_llama3_8b"], 15, 5)["prompt_len"] == 128
