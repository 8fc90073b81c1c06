"""Energon image-text data for the trainer (titanmm.data.vlm_data + energon.py): multi-image and text-only
samples, the captioning task, CaptioningSample / VQASample datasets, data-parallel sharding, exact resume
(and the logged restart when the layout changes), packing, skip counts and sqrt-length loss weights.

Datasets are built in tmp dirs: `tests/llava_data.py` (12 LLaVA records, 2 with a corrupt PNG) converted
with convert_llava, and a 3-sample WebDataset prepared by `energon prepare` as CaptioningSample / VQASample.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile

import pytest
import torch
from PIL import Image

pytest.importorskip("megatron.energon")

from megatron.energon import SkipSample  # noqa: E402

from tests.llava_data import CORRUPT_KEYS, good_keys, write_llava_dataset  # noqa: E402
from tests.utils import REPO  # noqa: E402
from titanmm.config import load_config  # noqa: E402
from titanmm.data.chat import encode_conversation  # noqa: E402
from titanmm.data.energon import ConversationSample, VLMTaskEncoder, greedy_knapsack  # noqa: E402
from titanmm.data.images import ImageProcessor  # noqa: E402
from titanmm.data.loss_weights import sqrt_length_weights  # noqa: E402
from titanmm.data.packed import IGNORE_INDEX  # noqa: E402
from titanmm.data.tokenizer import build_tokenizer  # noqa: E402
from titanmm.data.vlm_data import VLMData, build_vlm_data, default_chat_template, tiles_by_sample  # noqa: E402
from titanmm.models import get_model_spec  # noqa: E402

VLM = get_model_spec("vlm").flavors["debug_vlm"]
TOKENS_PER_TILE = 16  # debug_vlm: 32 px tiles
SEQ_LEN = 128


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return write_llava_dataset(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("")


def job(dataset, *overrides):
    return load_config(str(REPO / "train_configs" / "debug_vlm.toml"),
                       [f"--training.dataset={dataset}", f"--training.seq_len={SEQ_LEN}",
                        "--training.local_batch_size=2", "--multimodal.num_workers=0",
                        "--multimodal.shuffle_buffer_size=0", *overrides])


def vlm_data(config, rank=0, degree=1, accum=1) -> VLMData:
    return build_vlm_data(config, VLM, TOKENS_PER_TILE, rank, degree, accum)


def steps_of(data, steps, start=0):
    """[(sample keys, micro-batch)] of `steps` steps."""
    out = []
    for step in range(start, start + steps):
        mbs = data.microbatches(step)
        out += list(zip(data.last_sample_keys, mbs))
    return out


def _same(a, b):
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_convert_writes_indexed_images_for_multi_image_records(llava):
    stats = json.loads((llava / "conversion_stats.json").read_text())
    assert stats["written_train"] == 12 and len(stats["train_shards"]) == 4
    with tarfile.open(llava / "train-000000.tar") as tar:
        names = tar.getnames()
    assert {"s01.0.png", "s01.1.png", "s01.json", "s00.png", "s02.json"} <= set(names)
    assert not any(n.startswith("s02.") and n.endswith(".png") for n in names)  # text only


def test_batches_hold_every_image_of_a_sample_in_order(llava, tokenizer):
    data = vlm_data(job(llava))
    processor = ImageProcessor(data.encoder().image_config)
    records = {r["id"]: r for r in json.loads((llava.parent / "llava.json").read_text())}
    seen = set()
    for keys, mb in steps_of(data, 5):  # 10 samples: one pass over the good ones
        assert mb["input_ids"].shape == (2, SEQ_LEN) and mb["pixel_values"].shape[1:] == (3, 32, 32)
        tiles = torch.split(mb["pixel_values"], mb["tiles_per_sample"].tolist())
        for row, key in enumerate(keys):
            record = records[key]
            names = record.get("image", [])
            names = [names] if isinstance(names, str) else names
            assert mb["images_per_sample"][row] == len(names) == len(tiles[row])
            for tile, name in zip(tiles[row], names):
                expected = processor(llava.parent / "images" / name)
                assert torch.equal(tile, expected if expected.dim() == 3 else expected[0])
            is_image = mb["input_ids"][row] == VLM.image_token_id
            assert int(is_image.sum()) == TOKENS_PER_TILE * len(names)
            assert (mb["labels"][row][is_image] == IGNORE_INDEX).all()
            learned = mb["labels"][row][mb["labels"][row] != IGNORE_INDEX].tolist()
            replies = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
            assert tokenizer.decode(learned) == "".join(r + "<eos>" for r in replies)
            seen.add(key)
    assert seen == good_keys()
    metrics = data.pop_metrics()
    assert metrics["skipped_samples"] == metrics["skipped_samples/corrupt_image"] == len(CORRUPT_KEYS)
    assert 0 < metrics["packing_efficiency"] < 1


def test_data_parallel_ranks_read_disjoint_samples(llava):
    firsts = []
    for rank in (0, 1):
        keys = [k for keys, _ in steps_of(vlm_data(job(llava), rank, 2), 3) for k in keys]
        firsts.append(set(keys[:5]))  # each rank's half of the records holds 5 good samples
    assert not firsts[0] & firsts[1] and firsts[0] | firsts[1] == good_keys()
    # tensor-parallel ranks of one data-parallel group build the same loader: identical batches
    config = job(llava, "--multimodal.shuffle_buffer_size=8")
    one, other = steps_of(vlm_data(config, 1, 2), 2), steps_of(vlm_data(config, 1, 2), 2)
    assert all(_same(a, b) for a, b in zip(one, other))


@pytest.mark.parametrize("overrides", [["--multimodal.shuffle_buffer_size=8"],
                                       ["--multimodal.packing=true", "--multimodal.packing_buffer_size=5",
                                        "--multimodal.loss_scaling=sqrt_length"]])
def test_resume_continues_with_the_same_batches(llava, overrides):
    config = job(llava, *overrides)
    first = vlm_data(config, accum=2)
    steps_of(first, 2)
    state = first.state_dict()
    reference = steps_of(first, 3, start=2)
    second = vlm_data(config, accum=2)
    second.load_state_dict(state)
    assert second.next_step == 2
    resumed = steps_of(second, 3, start=2)
    assert all(_same(a, b) for a, b in zip(reference, resumed))
    with pytest.raises(RuntimeError, match="stream"):
        second.microbatches(7)


def test_changed_layout_restarts_the_stream_with_a_warning(llava, caplog):
    saved = vlm_data(job(llava), rank=0, degree=2)
    steps_of(saved, 2)
    state = saved.state_dict()
    resumed = vlm_data(job(llava))
    with caplog.at_level(logging.WARNING):
        resumed.load_state_dict(state)
    assert "data-parallel degree: checkpoint 2, now 1" in caplog.text and "restarts" in caplog.text
    assert resumed.next_step == 2 and resumed.seed_offset == job(llava).training.seed + 2
    assert len(steps_of(resumed, 1, start=2)) == 1
    changed = vlm_data(job(llava, "--multimodal.task=captioning"))
    with caplog.at_level(logging.WARNING):
        changed.load_state_dict(vlm_data(job(llava)).state_dict())
    assert "task: checkpoint 'sft', now 'captioning'" in caplog.text


def _sample(key, turns, images):
    return ConversationSample(__key__=key, __restore_key__=(), conversation=turns, images=images)


def test_captioning_learns_only_the_caption(llava, tokenizer):
    png = (llava.parent / "images" / "red.png").read_bytes()
    encoder = VLMTaskEncoder(tokenizer, "plain", VLM.image, VLM.image_token_id, TOKENS_PER_TILE, SEQ_LEN,
                             task="captioning")
    turns = [{"role": "user", "content": "<image>\nRender a short caption."},
             {"role": "assistant", "content": " A red square. "}]
    out = encoder.encode_sample(_sample("cap", turns, [png]))
    ids, mask = encode_conversation([{"role": "user", "content": "<image>\n"},
                                     {"role": "assistant", "content": "A red square."}], tokenizer, "plain",
                                    image_token_id=VLM.image_token_id)
    assert out["input_ids"].tolist().count(VLM.image_token_id) == TOKENS_PER_TILE
    text = tokenizer.decode([i for i in out["input_ids"].tolist() if i != VLM.image_token_id])
    assert "Render" not in text and len(out["input_ids"]) == len(ids) - 1 + TOKENS_PER_TILE - 1
    assert tokenizer.decode(out["labels"][out["labels"] != IGNORE_INDEX].tolist()) == "A red square.<eos>"
    assert sum(mask) == int((out["labels"] != IGNORE_INDEX).sum())
    with pytest.raises(SkipSample):
        encoder.encode_sample(_sample("two", turns + turns[:1] + [{"role": "assistant", "content": "More."}], [png]))
    assert encoder.skipped == {"not_a_caption": 1}


def _typed_dataset(root, sample_type, field_map):
    """Three images with a caption (.txt) and a question / answers / weights (.json), prepared by energon."""
    from megatron.energon.tools.prepare import command

    root.mkdir()
    with tarfile.open(root / "data-000000.tar", "w") as tar:
        for i, rgb in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
            png = io.BytesIO()
            Image.new("RGB", (40, 30), rgb).save(png, "PNG")
            meta = {"question": f"Which colour is {i}?", "answers": [f"colour {i}", f"best {i}"], "weights": [0.2, 0.8]}
            for name, data in ((f"c{i}.png", png.getvalue()), (f"c{i}.txt", f"Caption {i}.".encode()),
                               (f"c{i}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    command.main([str(root), "--non-interactive", "--force-overwrite", "--sample-type", sample_type, "--field-map",
                  json.dumps(field_map), "--split-parts", "train:data-[0-9]+[.]tar$", "--num-workers", "1",
                  "--no-progress"], standalone_mode=False)
    return root


@pytest.fixture(scope="module")
def typed(tmp_path_factory):
    root = tmp_path_factory.mktemp("typed")
    captions = _typed_dataset(root / "cap", "CaptioningSample", {"image": "png", "caption": "txt"})
    vqa = _typed_dataset(root / "vqa", "VQASample", {"image": "png", "context": "json[question]",
                                                      "answers": "json[answers]", "answer_weights": "json[weights]"})
    return captions, vqa


@pytest.mark.parametrize("task", ["sft", "captioning"])
def test_captioning_and_vqa_sample_datasets(typed, tokenizer, task):
    captions, vqa = typed
    for path, prompt, reply in ((captions, "", "Caption {}."), (vqa, "Which colour is {}?", "best {}")):
        data = vlm_data(job(path, "--training.local_batch_size=3", f"--multimodal.task={task}"))
        ((keys, mb),) = steps_of(data, 1)
        for row, key in enumerate(keys):
            i = key[1:]
            learned = mb["labels"][row][mb["labels"][row] != IGNORE_INDEX].tolist()
            assert tokenizer.decode(learned) == reply.format(i) + "<eos>"
            text = tokenizer.decode([t for t in mb["input_ids"][row].tolist() if t not in (VLM.image_token_id, 0)])
            expected_prompt = prompt.format(i) if task == "sft" and prompt else ""
            assert text == "<bos>\n" + (expected_prompt + "\n" if expected_prompt else "") + reply.format(i)
        assert mb["tiles_per_sample"].tolist() == [1, 1, 1]


def test_tile_budget_applies_to_every_image_of_a_sample(llava, tokenizer):
    args = get_model_spec("vlm").flavors["debug_vlm_internvit"]  # tiles of 56 px, 4 tokens, max 2 + thumbnail
    images = [(llava.parent / "images" / f"{c}.png").read_bytes() for c in ("red", "green")]  # 1 x 2 grids
    turns = [{"role": "user", "content": "<image> and <image>: same?"}, {"role": "assistant", "content": "No."}]
    roomy = VLMTaskEncoder(tokenizer, "plain", args.image, args.image_token_id, 4, 512).encode(turns, images)
    tight_len = len(roomy["input_ids"]) - 2
    tight = VLMTaskEncoder(tokenizer, "plain", args.image, args.image_token_id, 4, tight_len).encode(turns, images)
    assert roomy["num_tiles"].tolist() == [3, 3] and tight["num_tiles"].tolist() == [1, 1]  # budget 2 -> 1 for both
    assert len(tight["input_ids"]) <= tight_len
    processor = ImageProcessor(VLMTaskEncoder(tokenizer, "plain", args.image, args.image_token_id, 4, 512).image_config)
    expected = torch.cat([processor(data, max_tiles=1) for data in images])
    assert torch.equal(tight["pixel_values"], expected)


def test_greedy_knapsack():
    lengths = [70, 20, 50, 30, 100, 10, 60]
    bins = greedy_knapsack(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert bins[0] == [4] and bins[1] == [0, 3]  # the fullest bins first, longer items preferred
    with pytest.raises(ValueError):
        greedy_knapsack([101], 100)


def test_packed_rows_number_documents_and_restart_positions(llava):
    data = vlm_data(job(llava, "--multimodal.packing=true", "--multimodal.packing_buffer_size=10"))
    (keys, mb), = steps_of(data, 1)
    row_docs = [int(d.max()) for d in mb["document_ids"]]
    assert len(keys) > 2 and max(row_docs) >= 2  # several samples share a row
    for row in range(2):
        doc, pos = mb["document_ids"][row], mb["position_ids"][row]
        starts = torch.nonzero(torch.diff(doc) != 0).flatten() + 1
        assert (pos[starts] == 0).all() and pos[0] == 0
        assert (torch.diff(doc) >= 0).all()
    assert data.pop_metrics()["packing_efficiency"] > 0.6


def test_packing_keeps_documents_apart(llava, tokenizer):
    """A packed row's logits equal each sample's logits alone; changing one sample leaves the others unchanged."""
    from titanmm.models.vlm.model import VisionLanguageModel

    torch.manual_seed(0)
    model = VisionLanguageModel(VLM).float()
    model.init_weights(seed=3)
    model.eval()
    encoder = VLMTaskEncoder(tokenizer, "plain", VLM.image, VLM.image_token_id, TOKENS_PER_TILE, 160)
    images = {c: (llava.parent / "images" / f"{c}.png").read_bytes() for c in ("red", "green", "blue")}

    def sample(colour, question):
        turns = [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": colour}]
        return encoder.encode_sample(_sample(colour, turns, [images[colour]]))

    def logits(batch):
        with torch.no_grad():
            return model(batch["input_ids"], pixel_values=batch["pixel_values"], position_ids=batch["position_ids"],
                         document_ids=batch["document_ids"])[0]

    docs = [sample("red", "What colour?"), sample("green", "And this one?"), sample("blue", "Last one?")]
    packed = logits(encoder.batch([encoder.pack_selected_samples(docs)]))
    offsets = [0]
    for d in docs:
        offsets.append(offsets[-1] + len(d["input_ids"]))
    for d, start, end in zip(docs, offsets, offsets[1:]):
        alone = logits(encoder.batch([d]))[:end - start]
        torch.testing.assert_close(packed[start:end], alone, rtol=1e-5, atol=1e-5)
    changed = docs[:1] + [sample("blue", "Another question, longer?")] + docs[2:]
    batch = encoder.batch([encoder.pack_selected_samples(changed)])
    repacked = logits(batch)
    moved = len(changed[1]["input_ids"]) - len(docs[1]["input_ids"])
    torch.testing.assert_close(repacked[:offsets[1]], packed[:offsets[1]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(repacked[offsets[2] + moved:offsets[3] + moved], packed[offsets[2]:offsets[3]],
                               rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # without the document mask the last sample would see the changed one
        causal = model(batch["input_ids"], pixel_values=batch["pixel_values"], position_ids=batch["position_ids"])[0]
    assert not torch.allclose(causal[offsets[2] + moved:offsets[3] + moved], packed[offsets[2]:offsets[3]], atol=1e-3)


def test_sqrt_length_weights_reproduce_megatron_scaled_loss():
    torch.manual_seed(0)
    labels = torch.full((2, 12), IGNORE_INDEX)
    labels[0, 2:5] = 7   # turn of 3
    labels[0, 8:12] = 7  # turn of 4
    labels[1, 0:6] = 7   # 2 + 4 across a packed document boundary at 2
    document_ids = torch.tensor([[0] * 12, [0, 0] + [1] * 10])
    ce = torch.rand(2, 12)
    weights = sqrt_length_weights(labels, document_ids)
    ours = (weights * ce).sum() / weights.sum()
    turns = [(0, 2, 5), (0, 8, 12), (1, 0, 2), (1, 2, 6)]  # Megatron: sum_t mean_t * sqrt(n_t) / sum_t sqrt(n_t)
    norm = sum(math.sqrt(e - s) for _, s, e in turns)
    megatron = sum(ce[r, s:e].mean() * math.sqrt(e - s) for r, s, e in turns) / norm
    torch.testing.assert_close(ours, megatron)
    assert (weights[labels == IGNORE_INDEX] == 0).all()


def test_default_chat_templates():
    flavors = get_model_spec("vlm").flavors
    expected = {"llava_mistral_7b_clip336": "mistral", "llava_v1.6_mistral_7b_clip336": "mistral",
                "nvlm_d_34b": "nvlm-yi-34b", "nvlm_d_72b": "qwen2", "nemotron_nano_vl_8b": "llama3.1",
                "debug_vlm": "plain"}
    assert {name: default_chat_template(flavors[name]) for name in expected} == expected


def test_tiles_by_sample():
    pixels = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    by_sample, mask = tiles_by_sample(pixels, torch.tensor([2, 0, 3]))
    assert by_sample.shape == (3, 3, 3, 2, 2) and mask.tolist() == [[True, True, False], [False] * 3, [True] * 3]
    assert torch.equal(by_sample[mask], pixels)


def test_metadataset_blend_mixes_datasets_by_weight(llava, typed, tmp_path):
    """training.dataset = an energon metadataset .yaml: a weighted blend of a LLaVA conversation dataset and
    a CaptioningSample dataset; both kinds of samples arrive, in proportion to the weights."""
    captions, _ = typed
    blend = tmp_path / "blend.yaml"
    blend.write_text("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n    blend:\n"
                     f"      - weight: 1\n        path: {llava}\n      - weight: 3\n        path: {captions}\n")
    data = vlm_data(job(blend, "--multimodal.shuffle_buffer_size=0"))
    keys = [k for keys, _ in steps_of(data, 40) for k in keys]
    from_captions = sum(k.startswith("c") for k in keys)
    assert len(keys) == 80 and 0 < len(keys) - from_captions < from_captions
    assert 0.6 < from_captions / len(keys) < 0.9  # weight 3 of 4
