"""The LLaVA SFT side-by-side's data and peer on CPU: benchmarks/llava_sft_data.py (a few samples: exact lengths,
the LLaVA JSON, the energon conversion, the peer's file equal to what titanmm's loader makes, the cache) and
benchmarks/hf_llava_sft.py (batching, and a `--tiny` run under torchrun on 2 gloo ranks whose result line parses).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.energon")
pytest.importorskip("transformers")

from tests.utils import REPO, load_benchmark, run_env  # noqa: E402

SAMPLES, SEQ_LEN, SEED = 8, 4096, 0  # seed 0: sample 1 is text-only


data_builder, peer, compare = load_benchmark("llava_sft_data"), load_benchmark("hf_llava_sft"), load_benchmark("compare")
results_io = load_benchmark("results_io")


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("llava_sft") / "data"
    stats = data_builder.build_llava_sft_dataset(out, samples=SAMPLES, seq_len=SEQ_LEN, seed=SEED, unique_images=3,
                                                 workers=1, log=lambda *_: None)
    return out, stats


def test_samples_have_the_drawn_lengths(sft_data):
    out, stats = sft_data
    drawn = data_builder.draw_lengths(SAMPLES, SEQ_LEN, SEED)
    loaded = data_builder.load_peer_file(out / data_builder.PEER_FILE)
    assert stats["length_mismatches"] == 0 and stats["conversion"]["written_train"] == SAMPLES
    assert [len(ids) - 1 for ids, _, _ in loaded["samples"]] == [length for _, _, length in drawn]
    assert [len(images) for _, _, images in loaded["samples"]] == [images for _, images, _ in drawn]
    assert 0 < stats["lengths"]["text_only_fraction"] < 1
    assert loaded["tokens_per_image"] == 576 and loaded["seq_len"] == SEQ_LEN
    records = json.loads((out / data_builder.JSON_NAME).read_text())
    for record, (ids, targets, images) in zip(records, loaded["samples"]):
        roles = [turn["from"] for turn in record["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2)
        assert record["conversations"][0]["value"].startswith("<image>\n") == bool(images)
        assert (ids == loaded["image_token_id"]).sum() == 576 * len(images)
        assert targets[-1] and not targets[0] and ids.dtype == np.int32
    assert (out / "energon" / ".nv-meta" / "dataset.yaml").is_file()


def test_peer_file_is_what_titanmm_trains_on(sft_data):
    """Every sample through titanmm's energon loader (no packing, no shuffling) equals the peer's sample: the ids
    shifted by one, the learned targets, and the pixels of its image."""
    from titanmm.config import load_config
    from titanmm.data.packed import IGNORE_INDEX
    from titanmm.data.vlm_data import build_vlm_data
    from titanmm.models import get_model_spec

    out, _ = sft_data
    config = load_config(str(REPO / "train_configs" / "llava_mistral_clip_sft.toml"), [
        f"--training.dataset={out / 'energon'}", f"--training.seq_len={SEQ_LEN}", "--training.local_batch_size=1",
        "--model.tokenizer_path=", "--multimodal.chat_template=plain", "--multimodal.num_workers=0",
        "--multimodal.shuffle_buffer_size=0"])
    data = build_vlm_data(config, get_model_spec("vlm").flavors[compare.VLM_FLAVOR], 576, 0, 1, 1)
    samples = peer.SFTSamples(out)
    keys = data_builder.load_peer_file(out / data_builder.PEER_FILE)["keys"]
    seen = set()
    for step in range(SAMPLES):
        (mb,) = data.microbatches(step)
        (key,) = data.last_sample_keys[0]
        index = keys.index(key)
        mine = samples[index]
        n = len(mine["input_ids"]) - 1
        ids = mine["input_ids"].clone()
        ids[ids == peer.HF_IMAGE_TOKEN_ID] = samples.source_image_token_id
        assert torch.equal(mb["input_ids"][0, :n], ids[:-1])
        assert torch.equal(mb["labels"][0, :n], mine["labels"][1:])  # transformers' shift: the same targets
        assert (mb["labels"][0, n:] == IGNORE_INDEX).all()
        assert torch.equal(mb["pixel_values"], mine["pixel_values"])
        seen.add(key)
    data.close()
    assert len(seen) == SAMPLES


def test_dataset_is_reused_while_its_parameters_match(sft_data, capsys):
    out, stats = sft_data
    before = (out / data_builder.STATS_NAME).stat().st_mtime_ns
    assert data_builder.main([str(out), f"--samples={SAMPLES}", f"--seq-len={SEQ_LEN}", f"--seed={SEED}",
                              "--unique-images=3", "--workers=1"]) == 0
    assert "cached" in capsys.readouterr().out
    assert (out / data_builder.STATS_NAME).stat().st_mtime_ns == before


def test_batches_pad_to_the_longest_and_split_steps_over_ranks():
    assert peer.rank_indices(10, 2, 2, 1, 3) == [2, 3, 8, 9]  # step 0: samples 0-5, step 1: 6-11 (mod 10)
    one = {"input_ids": torch.tensor([1, 5, 6]), "labels": torch.tensor([-100, -100, 6]),
           "pixel_values": torch.zeros(0, 3, 336, 336)}
    two = {"input_ids": torch.tensor([1, 7]), "labels": torch.tensor([-100, 7]),
           "pixel_values": torch.ones(1, 3, 336, 336)}
    batch = peer.pad_collate([one, two])
    assert batch["input_ids"].tolist() == [[1, 5, 6], [1, 7, peer.PAD_ID]]
    assert batch["labels"].tolist() == [[-100, -100, 6], [-100, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["pixel_values"].shape == (1, 3, 336, 336)
    assert (batch["num_samples"], batch["num_tokens"], batch["padded_tokens"]) == (2, 5, 6)


def test_tiny_peer_under_torchrun_on_two_gloo_ranks(sft_data):
    out, _ = sft_data
    steps, warmup, batch = 2, 1, 2
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "benchmarks" / "hf_llava_sft.py"), "--data", str(out), "--tiny", f"--steps={steps}",
               f"--warmup={warmup}", f"--batch={batch}", "--num-workers=0", "--grad-ckpt"]
    proc = subprocess.run(command, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = results_io.last_json_line(proc.stdout, peer.RESULT_PREFIX)
    assert result is not None
    summary = compare.summarize_hf_llava_sft(proc.stdout)  # what the side by side reads of it
    assert summary["samples_per_s_per_gpu"] == result["samples_per_s_per_gpu"] > 0
    # the timed steps' samples, as rank_indices hands them out
    loaded = data_builder.load_peer_file(out / data_builder.PEER_FILE)["samples"]
    timed = [i for rank in range(2) for i in peer.rank_indices(SAMPLES, steps, batch, rank, 2)[warmup * batch:]]
    assert result["samples"] == len(timed) == 4 and result["gpus"] == 2 and result["grad_ckpt"]
    assert result["tokens"] == sum(len(loaded[i][0]) for i in timed)
    assert result["padded_tokens"] >= result["tokens"]
    assert result["samples_per_s_per_gpu"] == pytest.approx(4 / result["seconds"] / 2)
    assert 6 < result["loss"] < 9  # ~ln(2304) at random init (the tiny vocabulary)
    side = compare.summarize_hf_llava_sft(proc.stdout)
    assert side["tps_per_gpu"] == result["tokens_per_s_per_gpu"] and side["peak_mem_gib"] is None
