"""benchmarks/decode_throughput.py on the CPU with the debug flavors: results file and the --profile breakdown,
for a language model and (--model vlm) a vision-language model with one image per prompt."""

import json

import pytest

from tests.utils import load_benchmark

decode_throughput = load_benchmark("decode_throughput")


def test_decode_benchmark_writes_results_and_profiles(tmp_path):
    out = tmp_path / "decode.json"
    assert decode_throughput.main(["--flavor", "debug", "--batch", "1", "3", "--prompt-len", "8", "--new-tokens", "4",
                                   "--warmup", "1", "--iters", "1", "--device", "cpu", "--dtype", "fp32",
                                   "--json", str(out), "--profile", str(tmp_path / "profile")]) == 0
    result = json.loads(out.read_text())
    assert set(result["batches"]) == {"1", "3"} and 0 < result["batches"]["1"]["bandwidth_bound_fraction"]
    assert result["model"] == "llama" and result["image_tokens"] == 0 and result["prompt_tokens"] == 8
    assert result["commit"] and result["command"].startswith("python benchmarks/decode_throughput.py --flavor debug")
    for r in result["batches"].values():  # the call's roofline: prefill at the matmul rate, decode at the bandwidth
        assert r["roofline_tokens_per_s"] > 0 and r["roofline_prefill_flops"] > 0 and r["roofline_fraction"] > 0
    assert result["batches"]["3"]["roofline_decode_bytes"] > 3 * result["weight_bytes"]  # 3 steps + the KV cache
    breakdown = (tmp_path / "profile" / "decode_B3_kernels.txt").read_text()
    assert "generate, batch 3, 8 + 4 tokens" in breakdown and "matmul" in breakdown
    assert (tmp_path / "profile" / "decode_B3_trace.json").exists()


def test_vlm_decode_benchmark_writes_results(tmp_path):
    out = tmp_path / "decode_vlm.json"
    assert decode_throughput.main(["--model", "vlm", "--flavor", "debug_vlm", "--batch", "1", "2", "--prompt-len", "6",
                                   "--new-tokens", "3", "--warmup", "1", "--iters", "2", "--device", "cpu",
                                   "--dtype", "fp32", "--json", str(out), "--profile", str(tmp_path / "profile")]) == 0
    result = json.loads(out.read_text())
    model = decode_throughput.build_model("debug_vlm", decode_throughput.DTYPES["fp32"],
                                          decode_throughput.torch.device("cpu"), "vlm")
    per_image = model.tokens_per_tile(model.args.image.tile_size, model.args.image.tile_size)
    assert result["model"] == "vlm" and result["flavor"] == "debug_vlm"
    assert result["image_tokens"] == per_image > 0 and result["prompt_tokens"] == 1 + per_image + 6
    assert set(result["batches"]) == {"1", "2"}
    for r in result["batches"].values():
        assert r["new_tokens_per_s"] > 0 and len(r["seconds_all_calls"]) == 2
    assert 0 < result["batches"]["1"]["bandwidth_bound_fraction"]
    # The bound counts the language model's weights only (the vision tower and projector run in the prefill).
    lm_params = sum(p.numel() for p in model.lm.parameters()) - model.lm.tok_embeddings.weight.numel()
    assert result["params_read"] == lm_params and result["weight_bytes"] == 4 * lm_params
    breakdown = (tmp_path / "profile" / "decode_B2_kernels.txt").read_text()
    assert f"generate, batch 2, {1 + per_image + 6} + 3 tokens" in breakdown


def test_vlm_prompts_hold_one_image_per_row():
    torch = decode_throughput.torch
    model = decode_throughput.build_model("debug_vlm", torch.float32, torch.device("cpu"), "vlm")
    prompts, pixels = decode_throughput.make_inputs(model, 3, 5, torch.device("cpu"))
    per_image = decode_throughput.image_tokens(model)
    tile = model.args.image.tile_size
    assert prompts.shape == (3, 1 + per_image + 5) and pixels.shape == (3, 3, tile, tile)
    assert (prompts == model.args.image_token_id).sum(dim=1).tolist() == [per_image] * 3
    assert (prompts[:, 1:1 + per_image] == model.args.image_token_id).all()


def test_flavor_must_belong_to_the_model(capsys):
    with pytest.raises(SystemExit):
        decode_throughput.main(["--model", "vlm", "--flavor", "debug", "--device", "cpu"])
    assert "not a vlm flavor" in capsys.readouterr().err


@pytest.mark.parametrize("ablations", [["fused_qkv"], ["fused_w13"], ["fused_qkv", "fused_w13"]])
def test_ablations_turn_off_their_fused_projections(monkeypatch, ablations):
    """--without NAME...: inside generate's fused_projections, the named kinds of projection run separately, and
    ablations given together each take effect."""
    from titanmm.models.llama import LLAMA_FLAVORS, Transformer

    monkeypatch.setattr(Transformer, "fused_projections", Transformer.fused_projections)  # restored afterwards
    for name in ablations:
        decode_throughput.ABLATIONS[name]()
    model = Transformer(LLAMA_FLAVORS["debug"])
    layer = model.layers["0"]
    with model.fused_projections():
        assert layer.attention.use_fused_projections is ("fused_qkv" not in ablations)
        assert layer.feed_forward.use_fused_projections is ("fused_w13" not in ablations)
    assert not layer.attention.use_fused_projections and not layer.feed_forward.use_fused_projections
