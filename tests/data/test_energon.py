"""LLaVA JSON -> WebDataset shards -> energon loader -> titanmm tokens / labels / tiles.

Everything is built in a tmp dir: six records (generated PNGs, one truncated PNG) plus one record whose
image file is missing; the loader's output is compared with titanmm's own functions applied directly.
"""

from __future__ import annotations

import json
import random
import tarfile

import pytest
import torch
from PIL import Image

pytest.importorskip("megatron.energon")

from megatron.energon import SkipSample, WorkerConfig, get_loader, get_savable_loader, get_train_dataset  # noqa: E402

from data_testing import CharTokenizer  # noqa: E402
from titanmm.data.chat import encode_conversation, expand_images, sft_sample  # noqa: E402
from titanmm.data.convert_llava import convert  # noqa: E402
from titanmm.data.energon import (VLMTaskEncoder, first_fit_decreasing, fullest_first_bins,  # noqa: E402
                                  greedy_knapsack, image_config_from_args, llava_turns)
from titanmm.data.images import ImageProcessor  # noqa: E402
from titanmm.data.packed import IGNORE_INDEX  # noqa: E402
from titanmm.models.vlm.args import ImageArgs  # noqa: E402

IMAGE_TOKEN = 250
TOKENS_PER_TILE = 8
TILE = 32
LAYOUT = dict(tag_style="internvl", use_tile_tags=True)
LONG_ANSWER = "The long answer. " * 10


class ChatCharTokenizer(CharTokenizer):
    """CharTokenizer plus the ChatML special tokens."""

    SPECIALS = {"<|im_start|>": 200, "<|im_end|>": 201}

    def __init__(self):
        super().__init__(bos=False)
        self.vocab_size = 300

    def token_to_id(self, token):
        return self.SPECIALS.get(token)


def image_args(max_tiles=6):
    return ImageArgs(preset="internvl_448", tile_size=TILE, tiling="internvl", max_tiles=max_tiles,
                     use_thumbnail=True, tile_tags="nvlm", image_start="<img>", image_end="</img>")


def conv(*pairs):
    out = []
    for human, gpt in pairs:
        out += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return out


RECORDS = [
    {"id": "s0.jpg", "image": "red.png", "conversations": conv(("<image>\nWhat colour?", "Red."), ("Sure?", "Yes."))},
    {"id": "s1", "image": "tall.png", "conversations": conv(("Describe it.", "A tall green block."))},  # no <image>
    {"id": "s2", "conversations": conv(("Hello there", "Hi! How can I help?"))},  # text only
    {"id": "s3", "image": "wide.png", "conversations": conv(("<image>\nWide?", "Very wide."))},
    {"id": "s4", "image": "broken.png", "conversations": conv(("<image>\nAnd this?", "Broken."))},
    {"id": "s5", "image": "wide.png", "conversations": conv(("<image>\nTell me a lot.", LONG_ANSWER))},
]
MISSING = {"id": "s6", "image": "nowhere.png", "conversations": conv(("<image>\n?", "!"))}


def write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 20, 20)).save(folder / "red.png")
    tall = Image.new("RGBA", (24, 70), (20, 180, 40, 255))
    tall.putpixel((3, 3), (0, 0, 0, 0))  # transparency: composited on white by load_image
    tall.save(folder / "tall.png")
    wide = Image.linear_gradient("L").resize((128, 32)).convert("RGB")
    wide.save(folder / "wide.png")
    (folder / "broken.png").write_bytes((folder / "red.png").read_bytes()[:70])  # truncated PNG


def expected_sample(record, images, seq_len, tokenizer, max_tiles):
    """input_ids / labels / pixels computed directly with titanmm's functions (no energon)."""
    turns = llava_turns(record["conversations"], "image" in record)
    ids, mask = encode_conversation(turns, tokenizer, "chatml", image_token_id=IMAGE_TOKEN)
    if "image" not in record:
        return sft_sample(ids, mask), torch.zeros(0, 3, TILE, TILE)
    processor = ImageProcessor(image_config_from_args(image_args()))
    pixels = processor(images / record["image"], max_tiles=max_tiles)
    expanded, loss_mask = expand_images(ids, mask, tokenizer, image_token_id=IMAGE_TOKEN,
                                        tokens_per_tile=TOKENS_PER_TILE, num_tiles=pixels.shape[0], **LAYOUT)
    assert len(expanded.input_ids) - 1 <= seq_len
    return sft_sample(expanded.input_ids.tolist(), loss_mask.tolist()), pixels


def seq_len_for(tokenizer):
    """A seq_len for which record s5 does not fit with 5 tiles (max_tiles 6 or 4) but does with 3 (max_tiles 2)."""
    turns = llava_turns(RECORDS[5]["conversations"], True)
    ids, mask = encode_conversation(turns, tokenizer, "chatml", image_token_id=IMAGE_TOKEN)
    lengths = {n: len(expand_images(ids, mask, tokenizer, image_token_id=IMAGE_TOKEN, tokens_per_tile=TOKENS_PER_TILE,
                                    num_tiles=n, **LAYOUT)[0].input_ids) for n in (3, 5)}
    seq_len = lengths[3] - 1 + 2
    assert lengths[5] - 1 > seq_len
    return seq_len


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("energon")
    images = root / "images"
    write_images(images)
    (root / "llava.json").write_text(json.dumps(RECORDS + [MISSING]))
    verified = convert(root / "llava.json", images, root / "verified", shard_size=2, num_workers=1, progress=False)
    raw = convert(root / "llava.json", images, root / "raw", shard_size=4, verify_images=False, num_workers=1,
                  progress=False)
    return root, images, verified, raw


def test_convert_writes_prepared_dataset(dataset):
    root, _, verified, raw = dataset
    assert verified["skipped_corrupt_image"] == 1 and verified["skipped_missing_image"] == 1
    assert verified["written_train"] == 5 and verified["train_shards"] == ["train-000000.tar", "train-000001.tar",
                                                                         "train-000002.tar"]
    assert raw["skipped_missing_image"] == 1 and "skipped_corrupt_image" not in raw and raw["written_train"] == 6
    meta = root / "raw" / ".nv-meta"
    assert "CrudeWebdataset" in (meta / "dataset.yaml").read_text()
    assert "train-{000000..000001}.tar" in (meta / "split.yaml").read_text()  # energon brace-collapses the parts
    assert json.loads((root / "raw" / "conversion_stats.json").read_text())["written_train"] == 6


def test_val_fraction(dataset, tmp_path):
    root, images, _, _ = dataset
    stats = convert(root / "llava.json", images, tmp_path / "out", shard_size=10, val_fraction=0.4, num_workers=1,
                    progress=False)
    assert stats["written_train"] + stats["written_val"] == 5 and stats["written_val"] == 2
    assert "val-000000.tar" in (tmp_path / "out" / ".nv-meta" / "split.yaml").read_text()


def load_all(path, encoder, batch_size=2):
    worker_config = WorkerConfig(rank=0, world_size=1, num_workers=0)
    ds = get_train_dataset(path, worker_config=worker_config, batch_size=batch_size, shuffle_buffer_size=None,
                           max_samples_per_sequence=None, task_encoder=encoder, repeat=False)
    return list(get_loader(ds))


def test_loader_matches_titanmm(dataset):
    root, images, _, _ = dataset
    tokenizer = ChatCharTokenizer()
    seq_len = seq_len_for(tokenizer)
    encoder = VLMTaskEncoder(tokenizer, "chatml", image_args(), IMAGE_TOKEN, TOKENS_PER_TILE, seq_len)
    batches = load_all(str(root / "raw"), encoder)
    got = {}
    for batch in batches:
        assert batch["input_ids"].shape[1] == seq_len and batch["labels"].shape == batch["input_ids"].shape
        tiles = iter(torch.split(batch["pixel_values"], batch["num_tiles"].tolist()))
        for row, (key, n_images) in enumerate(zip(batch["__keys__"], batch["images_per_sample"].tolist())):
            pixels = [next(tiles) for _ in range(n_images)]
            got[key] = (batch["input_ids"][row], batch["labels"][row], pixels)
    assert sorted(got) == ["s0_jpg", "s1", "s2", "s3", "s5"]  # s4's image is corrupt
    assert encoder.skipped == {"corrupt_image": 1}
    max_tiles = {"s5": 2}  # dropped from 6 (5 tiles) over 4 (5 tiles) to 2 (3 tiles)
    for record in RECORDS:
        key = record["id"].replace(".", "_")
        if key == "s4":
            continue
        expected, pixels = expected_sample(record, images, seq_len, tokenizer, max_tiles.get(key, 6))
        input_ids, labels, got_pixels = got[key]
        n = len(expected["input_ids"])
        assert torch.equal(input_ids[:n], expected["input_ids"]), key
        assert torch.equal(labels[:n], expected["labels"]), key
        assert (input_ids[n:] == tokenizer.pad_id).all() and (labels[n:] == IGNORE_INDEX).all()
        assert not (labels == IMAGE_TOKEN).any() and not ((input_ids == IMAGE_TOKEN) & (labels != IGNORE_INDEX)).any()
        if "image" in record:
            assert len(got_pixels) == 1 and torch.equal(got_pixels[0], pixels), key
        else:
            assert got_pixels == []
    assert got["s5"][2][0].shape[0] == 3 and got["s3"][2][0].shape[0] == 5
    # the learned tokens are exactly the assistant replies + <|im_end|>
    learned = got["s2"][1][got["s2"][1] != IGNORE_INDEX].tolist()
    assert tokenizer.decode([t for t in learned if t < 200]) == "Hi! How can I help?"
    assert learned.count(201) == 1


def test_too_long_and_tile_budget_order(dataset):
    root, images, _, _ = dataset
    tokenizer = ChatCharTokenizer()
    seq_len = seq_len_for(tokenizer)
    record = RECORDS[5]
    turns = llava_turns(record["conversations"], True)
    data = (images / record["image"]).read_bytes()
    encoder = VLMTaskEncoder(tokenizer, "chatml", image_args(max_tiles=12), IMAGE_TOKEN, TOKENS_PER_TILE, seq_len)
    assert encoder.encode(turns, data)["pixel_values"].shape[0] == 3  # 12 -> 8 -> 6 -> 4 -> 2
    short = VLMTaskEncoder(tokenizer, "chatml", image_args(), IMAGE_TOKEN, TOKENS_PER_TILE, 40)
    with pytest.raises(SkipSample):
        short.encode(turns, data, "s5")
    with pytest.raises(SkipSample):
        short.encode(llava_turns(RECORDS[2]["conversations"] * 3, False), None, "s2")
    assert short.skipped == {"too_long": 2}
    with pytest.raises(SkipSample):
        short.encode(llava_turns(RECORDS[2]["conversations"], True), None, "placeholder-without-image")
    assert short.skipped["image_mismatch"] == 1


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    return a["__keys__"] == b["__keys__"] and all(torch.equal(a[k], b[k]) for k in
                                                  ("input_ids", "labels", "pixel_values", "num_tiles"))


@pytest.mark.parametrize("packing_buffer_size", [None, 3])
def test_savable_loader_state_round_trip(dataset, packing_buffer_size):
    """A restored loader continues with the same batches, also with packing: energon re-creates the samples of
    its packing buffers (and of packs not yet emitted) from their restore keys."""
    root, _, _, _ = dataset
    tokenizer = ChatCharTokenizer()
    seq_len = seq_len_for(tokenizer)

    def loader():
        encoder = VLMTaskEncoder(tokenizer, "chatml", image_args(), IMAGE_TOKEN, TOKENS_PER_TILE, seq_len)
        ds = get_train_dataset(str(root / "raw"), worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
                               batch_size=2, shuffle_buffer_size=4, max_samples_per_sequence=2, task_encoder=encoder,
                               packing_buffer_size=packing_buffer_size)
        return get_savable_loader(ds)

    first = loader()
    it = iter(first)
    _take(it, 3)
    state = first.save_state_rank()
    reference = _take(it, 4)

    second = loader()
    second.restore_state_rank(state)
    resumed = _take(iter(second), 4)
    assert all(_same(a, b) for a, b in zip(reference, resumed))
    if packing_buffer_size:
        assert any(len(b["__keys__"]) > len(b["input_ids"]) for b in reference)  # rows of several samples


def _packed_loader(root, encoder, packing_buffer_size):
    ds = get_train_dataset(str(root / "raw"), worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
                           batch_size=2, shuffle_buffer_size=4, max_samples_per_sequence=2, task_encoder=encoder,
                           packing_buffer_size=packing_buffer_size)
    return get_savable_loader(ds)


def _identical(a, b):
    fields = ("input_ids", "labels", "position_ids", "document_ids", "pixel_values", "num_tiles", "images_per_sample",
              "tiles_per_sample", "num_tokens")
    return a["__keys__"] == b["__keys__"] and a["skipped"] == b["skipped"] and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in fields)


@pytest.mark.parametrize("packing_buffer_size", [2, 3, 5])
def test_packed_batches_same_with_pixels_made_per_pack(dataset, packing_buffer_size):
    """The packing buffer holds samples without pixels, which are made for each pack as energon emits it: the
    batches, their skip counts and a resume mid-stream are bit for bit those of buffering fully encoded samples
    (`defer_pixels_when_packing = False`, the pipeline before the split)."""
    root, _, _, _ = dataset
    tokenizer = ChatCharTokenizer()
    seq_len = seq_len_for(tokenizer)

    def encoder(defer):
        enc = VLMTaskEncoder(tokenizer, "chatml", image_args(), IMAGE_TOKEN, TOKENS_PER_TILE, seq_len)
        enc.defer_pixels_when_packing = defer
        return enc

    eager_encoder, split_encoder = encoder(False), encoder(True)
    eager = _take(iter(_packed_loader(root, eager_encoder, packing_buffer_size)), 10)
    first = _packed_loader(root, split_encoder, packing_buffer_size)
    it = iter(first)
    split = _take(it, 3)
    state = first.save_state_rank()
    split += _take(it, 7)
    assert all(_identical(a, b) for a, b in zip(eager, split))
    assert split_encoder.skipped == eager_encoder.skipped and split_encoder.skipped["corrupt_image"] >= 1
    assert sum(sum(b["skipped"].values()) for b in split) == sum(split_encoder.skipped.values())
    second = _packed_loader(root, encoder(True), packing_buffer_size)
    second.restore_state_rank(state)
    assert all(_identical(a, b) for a, b in zip(eager[3:], _take(iter(second), 7)))


def _pipeline(ds):
    """The wrapped datasets of an energon dataset, outermost first."""
    chain = []
    while ds is not None:
        chain.append(ds)
        ds = getattr(ds, "dataset", None)
    return chain


@pytest.mark.parametrize("packing_buffer_size", [None, 3])
def test_pipeline_hooks(dataset, packing_buffer_size):
    """Without packing energon maps `encode_sample` (pixels included) and nothing after it; with packing it maps
    `preencode_sample` before the packing buffer and runs `postencode_sample` on each emitted pack."""
    from megatron.energon.wrappers import MapDataset, PackingDataset

    root, _, _, _ = dataset
    tokenizer = ChatCharTokenizer()
    encoder = VLMTaskEncoder(tokenizer, "chatml", image_args(), IMAGE_TOKEN, TOKENS_PER_TILE, seq_len_for(tokenizer))
    ds = get_train_dataset(str(root / "raw"), worker_config=WorkerConfig(rank=0, world_size=1, num_workers=0),
                           batch_size=2, shuffle_buffer_size=None, max_samples_per_sequence=None,
                           task_encoder=encoder, packing_buffer_size=packing_buffer_size)
    chain = _pipeline(ds)
    maps = [d.map_fn.__name__ for d in chain
            if isinstance(d, MapDataset) and getattr(d.map_fn, "__self__", None) is encoder]
    packing = [d for d in chain if isinstance(d, PackingDataset)]
    assert not encoder._split_encoding  # only while building
    if packing_buffer_size is None:
        assert maps == ["encode_batch", "encode_sample"] and not packing
    else:
        assert maps == ["encode_batch", "preencode_sample"]
        assert packing[0].sample_encoder == encoder.postencode_sample and packing[0].sample_encoder_stateless


def test_preencoded_sample_holds_no_pixels(dataset):
    """What the packing buffer holds: tokens, labels, tile counts and the image bytes, not pixels; `add_pixels`
    then gives exactly `encode`'s sample. A corrupt image is the same counted skip in `preencode` as in `encode`."""
    from titanmm.data.energon import ConversationSample

    root, images, _, _ = dataset
    tokenizer = ChatCharTokenizer()
    encoder = VLMTaskEncoder(tokenizer, "chatml", image_args(), IMAGE_TOKEN, TOKENS_PER_TILE, seq_len_for(tokenizer))
    for record in RECORDS:
        data = [(images / record["image"]).read_bytes()] if "image" in record else []
        sample = ConversationSample(__key__=record["id"], __restore_key__=(), conversation=llava_turns(
            record["conversations"], len(data)), images=data)
        if record.get("image") == "broken.png":
            for hook in (encoder.encode_sample, encoder.preencode_sample):
                with pytest.raises(SkipSample):
                    hook(sample)
            continue
        full, pre = encoder.encode_sample(sample), encoder.preencode_sample(sample)
        assert "pixel_values" not in pre and pre["images"] == data and all(a is b for a, b in zip(pre["images"], data))
        assert all(isinstance(v, (torch.Tensor, list, tuple, str, int, type(None))) for v in pre.values())
        post = encoder.postencode_sample(pre)
        assert "images" in pre and "images" not in post and "tile_budget" not in post  # a new dict
        assert sorted(post) == sorted(full)
        for k, v in full.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == post[k].dtype and torch.equal(v, post[k]), (record["id"], k)
            else:
                assert v == post[k], (record["id"], k)
    assert encoder.skipped == {"corrupt_image": 2}


def test_convert_from_saved_hf_dataset(dataset, tmp_path):
    """A saved HF dataset (Image feature) converts to the same samples, image bytes unchanged, as the JSON."""
    datasets = pytest.importorskip("datasets")
    root, images, _, _ = dataset
    usable = [r for r in RECORDS if r["id"] != "s4"]  # s4's image is corrupt
    rows = {"id": [r["id"] for r in usable], "conversations": [r["conversations"] for r in usable],
            "image": [str(images / r["image"]) if "image" in r else None for r in usable]}
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "conversations": [{"from": datasets.Value("string"),
                                                     "value": datasets.Value("string")}]})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        str(tmp_path / "hf"))
    stats = convert(None, None, tmp_path / "from_hf", shard_size=10, num_workers=1, progress=False,
                    hf_dataset=tmp_path / "hf")
    assert stats["written_train"] == len(usable)
    tokenizer = ChatCharTokenizer()
    seq_len = seq_len_for(tokenizer)

    def samples(path):
        encoder = VLMTaskEncoder(tokenizer, "chatml", image_args(), IMAGE_TOKEN, TOKENS_PER_TILE, seq_len)
        out = {}
        for batch in load_all(str(path), encoder):
            for row, key in enumerate(batch["__keys__"]):
                out[key] = batch["input_ids"][row]
            out[tuple(batch["__keys__"])] = batch["pixel_values"]
        return out

    from_json, from_hf = samples(root / "verified"), samples(tmp_path / "from_hf")
    for key in ("s0_jpg", "s1", "s2", "s3", "s5"):
        assert torch.equal(from_json[key], from_hf[key]), key
    with tarfile.open(tmp_path / "from_hf" / "train-000000.tar") as tar:
        stored = tar.extractfile("s0_jpg.png").read()
    assert stored == (images / "red.png").read_bytes()



def _fullest_total(lengths, capacity):
    """The largest total <= capacity of any subset (brute force)."""
    totals = (sum(n for i, n in enumerate(lengths) if mask >> i & 1) for mask in range(1 << len(lengths)))
    return max(t for t in totals if t <= capacity)


def _check_bins(bins, lengths, capacity):
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # nothing dropped or repeated
    assert all(b and sum(lengths[i] for i in b) <= capacity for b in bins)
    assert all([(-lengths[i], i) for i in b] == sorted((-lengths[i], i) for i in b) for b in bins)


def test_greedy_knapsack_fills_each_bin_most():
    # first-fit decreasing needs 3 bins ([40, 35], [35, 30, 30], [30]); the fullest subsets need 2
    lengths = [30, 40, 35, 30, 35, 30]
    assert first_fit_decreasing(lengths, 100) == [[1, 2], [4, 0, 3], [5]]
    assert greedy_knapsack(lengths, 100) == fullest_first_bins(lengths, 100) == [[2, 4, 0], [1, 3, 5]]
    # ... and on rare inputs the other way round: then greedy_knapsack takes first-fit decreasing's bins
    lengths = [21, 31, 12, 20, 31, 13]
    assert fullest_first_bins(lengths, 50) == [[0, 5, 2], [1], [4], [3]]  # 46, then no two of 31, 31, 20 fit
    assert greedy_knapsack(lengths, 50) == first_fit_decreasing(lengths, 50) == [[1, 5], [4, 2], [0, 3]]
    rng = random.Random(0)
    for trial in range(300):
        capacity = rng.choice([50, 100, 337])
        lengths = [rng.randint(0 if trial % 7 == 0 else 1, capacity) for _ in range(rng.randint(0, 12))]
        fullest, fitted, bins = (f(lengths, capacity) for f in (fullest_first_bins, first_fit_decreasing,
                                                                 greedy_knapsack))
        for b in (fullest, fitted, bins):
            _check_bins(b, lengths, capacity)
        assert greedy_knapsack(list(lengths), capacity) == bins  # deterministic
        assert bins == (fitted if len(fitted) < len(fullest) else fullest)
        left = list(range(len(lengths)))  # each bin is the fullest subset of what the bins before it left
        for b in fullest:
            assert sum(lengths[i] for i in b) == _fullest_total([lengths[i] for i in left], capacity)
            left = [i for i in left if i not in b]
    assert greedy_knapsack([], 10) == [] and greedy_knapsack([0, 0], 10) == [[0, 1]]
    for bad in ([11], [-1]):
        with pytest.raises(ValueError):
            greedy_knapsack(bad, 10)

def test_select_samples_to_pack_groups_every_sample_once():
    tokenizer = ChatCharTokenizer()
    encoder = VLMTaskEncoder(tokenizer, "chatml", image_args(), IMAGE_TOKEN, TOKENS_PER_TILE, 64)
    lengths = [64, 40, 30, 24, 20, 17, 10, 9, 3, 1]
    samples = [{"input_ids": torch.zeros(n, dtype=torch.long), "__keys__": [f"k{i}"]} for i, n in enumerate(lengths)]
    groups = encoder.select_samples_to_pack(samples)
    assert sorted(k for g in groups for s in g for k in s["__keys__"]) == sorted(f"k{i}" for i in range(10))
    assert [sum(len(s["input_ids"]) for s in g) for g in groups] == [64, 64, 64, 26]
