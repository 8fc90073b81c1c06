"""benchmarks/vlm_packing.py: a tiny run writes its results file, and its simulation of energon's packing rounds
forms exactly the rows that energon's own PackingDataset forms from the same samples."""

from __future__ import annotations

import json

import pytest

from tests.utils import load_benchmark

pytest.importorskip("megatron.energon")


vlm_packing = load_benchmark("vlm_packing")


def test_tiny_run_writes_results(tmp_path):
    out = vlm_packing.main(["--samples", "3000", "--seq-lens", "2048", "--buffer-sizes", "8", "64",
                            "--results-dir", str(tmp_path)])
    (path,) = tmp_path.glob("*_cpu_vlm_packing.json")
    assert json.loads(path.read_text()) == out
    assert out["device"].startswith("cpu: ") and out["device"].endswith(" cores") and out["date"] in path.name
    assert out["command"].startswith("python benchmarks/vlm_packing.py --samples 3000")
    for name in ("llava_665k_sft", "llava_558k_captions"):
        runs = out["results"][name]["runs"]
        assert [(r["seq_len"], r["buffer_size"]) for r in runs] == [(2048, 8), (2048, 64)]
        for run in runs:
            assert 0.5 < run["first_fit_decreasing_efficiency"] <= run["efficiency"] <= run["bound"] <= 1
            assert run["samples"] + run["skipped_too_long"] == 3000
    sft = out["results"]["llava_665k_sft"]
    assert sft["runs"][1]["efficiency"] > sft["runs"][0]["efficiency"]  # a larger buffer packs tighter
    assert sft["runs"][0]["skipped_too_long"] > 0  # ShareGPT's long tail
    assert 650 < sft["distribution"]["mean_length"] < 900


def test_distributions_are_seeded():
    a, which = vlm_packing.sample_lengths(vlm_packing.LLAVA_665K_SFT, 500, seed=3)
    b, _ = vlm_packing.sample_lengths(vlm_packing.LLAVA_665K_SFT, 500, seed=3)
    assert (a == b).all() and not (a == vlm_packing.sample_lengths(vlm_packing.LLAVA_665K_SFT, 500, seed=4)[0]).all()
    text_only = which == [p.name for p in vlm_packing.LLAVA_665K_SFT].index("sharegpt")
    assert (a[~text_only] >= vlm_packing.IMAGE_TOKENS).all() and (a[text_only] < 8000).all()
    captions, _ = vlm_packing.sample_lengths(vlm_packing.LLAVA_558K_CAPTIONS, 500, seed=0)
    assert captions.min() >= 576 + 15 and captions.max() <= 576 + 65


def test_simulation_matches_energon_packing(tmp_path):
    """The rows energon's PackingDataset forms with VLMTaskEncoder equal the simulation's rows over the same
    stream of sample lengths (rounds of the buffer size, a partial last round)."""
    from megatron.energon import WorkerConfig, get_loader, get_train_dataset

    from tests.llava_data import write_llava_dataset
    from titanmm.data.energon import VLMTaskEncoder
    from titanmm.data.tokenizer import build_tokenizer
    from titanmm.models import get_model_spec

    path = str(write_llava_dataset(tmp_path))
    args = get_model_spec("vlm").flavors["debug_vlm"]
    tokenizer = build_tokenizer("")

    def batches(buffer_size):
        encoder = VLMTaskEncoder(tokenizer, "plain", args.image, args.image_token_id, 16, 96)
        dataset = get_train_dataset(path, worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
                                    batch_size=1, shuffle_buffer_size=None, max_samples_per_sequence=None,
                                    task_encoder=encoder, packing_buffer_size=buffer_size, repeat=False)
        return list(get_loader(dataset))

    stream = batches(None)  # one sample per batch, in stream order
    keys = [b["__keys__"][0] for b in stream]
    lengths = [int(b["num_tokens"][0]) for b in stream]
    assert len(keys) == 10 and len(set(lengths)) > 3
    encoder = VLMTaskEncoder(tokenizer, "plain", args.image, args.image_token_id, 16, 96)
    for buffer_size in (3, 4, 16):
        simulated = vlm_packing.simulate_energon_packing(lengths, buffer_size, encoder.select_samples_to_pack, 96)
        packed = [list(b["__keys__"]) for b in batches(buffer_size)]
        assert packed == [[keys[i] for i in row] for row in simulated["rows"]], buffer_size
    assert any(len(row) > 1 for row in packed)
