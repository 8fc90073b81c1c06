"""megatron-energon task encoder for image-text data: LLaVA-style conversations (see `convert_llava.py`) and
energon's own `CaptioningSample` / `VQASample` datasets.

    from megatron.energon import WorkerConfig, get_savable_loader, get_train_dataset
    encoder = VLMTaskEncoder(tokenizer, "chatml", image_args, image_token_id, tokens_per_tile, seq_len)
    dataset = get_train_dataset(path, worker_config=WorkerConfig(rank=dp_rank, world_size=dp_size, num_workers=4),
                                batch_size=8, shuffle_buffer_size=100, max_samples_per_sequence=100,
                                task_encoder=encoder, packing_buffer_size=None)  # an int packs samples
    for batch in get_savable_loader(dataset):
        batch["input_ids"], batch["labels"]       # [B, seq_len]; labels -100 where not learned / padding
        batch["position_ids"], batch["document_ids"]  # [B, seq_len]; restart / count per packed sample
        batch["pixel_values"]                     # [total tiles in the batch, 3, S, S]
        batch["num_tiles"]                        # [images in the batch], tiles of each image, in order
        batch["images_per_sample"]                # [B] images of each row
        batch["tiles_per_sample"]                 # [B] tiles of each row
        batch["num_tokens"]                       # [B] non-pad tokens of each row
        batch["skipped"]                          # {reason: count} skipped since this worker's last batch

Pipeline per sample:

1. cook (`cook_llava`): the crude WebDataset dict (`json` + image bytes) becomes a `ConversationSample`;
   LLaVA roles map human -> user, gpt -> assistant, system -> system. Images are `KEY.jpg` (one image) or
   `KEY.0.jpg`, `KEY.1.png`, ... (several, in the order of their `<image>` placeholders), as
   `convert_llava` writes them. A sample with images but no `<image>` placeholder gets one `"<image>\\n"`
   per image in front of its first user turn (LLaVA's rule). Typed energon samples need no cooking:
   `CaptioningSample` (image + caption) and `VQASample` (image + context + answers; the answer of largest
   weight, else the first, is the reply) are turned into turns by `sample_turns`.
2. The task. "sft": every assistant turn is learned. "captioning" (projector pretraining, LLaVA-Pretrain /
   Megatron's `encode_llava_pretrain`): the user turn is only the image placeholders (`"<image>\\n"` each,
   whatever instruction the data had) and the single assistant reply, the caption, is learned; a
   conversation with more than one reply is skipped ("not_a_caption"). Captions are encoded with
   `chat.encode_caption`. System and user turns, image tokens and tags are never learned.
3. `encode`: `chat.encode_conversation` with each image placeholder as one id, then the tile budget of the
   images is chosen: the largest of (max_tiles, then Megatron's 12 -> 8 -> 6 -> 4 -> 2 -> 1 below it) for
   which the expanded sample fits (`len(ids) - 1 <= seq_len`); the budget applies to every image of the
   sample (tile counts from `tiling.num_tiles_for`, so pixels are made once, for the chosen budget).
   `chat.expand_images` lays out tags + image tokens; `chat.sft_sample` makes input_ids / labels. Text is
   never truncated: a sample that does not fit even with one tile per image is skipped ("too_long").
   Without packing this is energon's one `encode_sample` step, pixels included.
4. Packing (only when the dataset is built with `packing_buffer_size`): the encoding is split around energon's
   packing buffer. `preencode_sample` (step 3 without the pixels: every image is decoded, so that a corrupt or too
   large image is the same counted skip, at the same point, as without the split (a truncated file's header, and so
   its size, reads fine: only decoding finds it), and its upright size gives the tile counts, then the pixels are
   dropped) puts into the buffer what selection needs: input_ids, labels, tiles per image, the tile budget and the
   image bytes (~0.1 MB per COCO JPEG instead of 1.4 MB of CLIP-336 or up to 31 MB of 12-tile + thumbnail
   InternViT-448 float32 pixels). `select_samples_to_pack` groups a buffer into sequences of at most seq_len tokens,
   each sequence in turn the subset of the remaining samples that fills it most (`greedy_knapsack`); energon then
   runs `postencode_sample` on each sample of a group as it emits it (`add_pixels`: the image bytes decoded again
   and tiled with the chosen budget, bit for bit `encode`'s pixels), and `pack_selected_samples` concatenates the
   group. So only the pack being emitted has pixels, the first batch waits for the buffer's text and image decoding,
   not its tiling, and each image is decoded twice (~4 ms for a 640x480 JPEG;
   `VLMTaskEncoder.defer_pixels_when_packing = False` buffers fully encoded samples instead: the same batches, the
   pixels of the whole buffer in memory). energon (its `PackingDataset`) hands over one full buffer at a time and
   emits every returned group, in order, before it selects from the next buffer: a sample left out of all groups
   would be dropped, and none can wait for the next buffer (energon's checkpoint holds only its own buffers), so
   every sample of a buffer is packed in that buffer's groups. The checkpoint holds restore keys, not samples: on
   resume energon re-creates the buffered samples with `preencode_sample` and a pack with `preencode_sample` +
   `postencode_sample` + `pack_selected_samples` (all `@stateless`), so a resumed loader emits the same batches.
   `batch` then gives every packed sample its own document id and positions restarting at 0, so the language model's
   document masking keeps the samples from attending to each other (labels never cross a sample boundary: each is
   shifted on its own).
5. `batch`: pads input_ids (pad id) and labels (-100) to seq_len (in a packed row the padding is one more
   document); tiles of all images are concatenated, row after row.

Skips raise energon's `SkipSample`, are logged, and are counted in `encoder.skipped` (a Counter over
`SKIP_REASONS`, cumulative, per process) and in each batch's `skipped` dict (the counts since the previous
batch of the same process), which is how the counts of loader worker processes reach the trainer.

Image bytes reach the encoder undecoded (`TextFieldDecoder` decodes only text and JSON fields), so EXIF
rotation, transparency and corrupt file handling are titanmm's, bit for bit the same as reading the file
directly, and a corrupt image is a counted skip rather than an energon decoding error.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from contextlib import contextmanager
from typing import NamedTuple, Sequence

import torch
import webdataset.autodecode
from megatron.energon import (CaptioningSample, Cooker, DefaultTaskEncoder, Sample, SampleDecoder, SkipSample,
                              VQASample, basic_sample_keys, cooker, edataclass, stateless)

from titanmm.data.chat import encode_caption, encode_conversation, expand_images, get_chat_template, sft_sample
from titanmm.data.images import (EXACT, PATCH_MULTIPLE, ImageConfig, ImageDecodeError, ImageTooLargeError, load_image,
                                 preprocess_single, preprocess_tiles)
from titanmm.data.packed import IGNORE_INDEX, positions_within_documents
from titanmm.data.prompts import DEFAULT_PLACEHOLDER, IMAGE_TAGS, NEMOTRON_TILE_TAG_FORMAT, TILE_TAG_FORMAT
from titanmm.data.tiling import num_tiles_for
from titanmm.data.vlm_data import TASKS

logger = logging.getLogger(__name__)

# Megatron's tile budgets when a sample is too long (largest first).
MEGATRON_TILE_BUDGETS = (12, 8, 6, 4, 2, 1)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tiff", "img")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# Why a sample is skipped (the batch dicts and the trainer's metrics use these names).
SKIP_REASONS = ("corrupt_image", "image_too_large", "image_mismatch", "image_token_in_text", "too_long",
                "not_a_caption", "no_learned_tokens")
# A process that skips this many samples in a row stops with an error (e.g. a seq_len no sample fits), rather
# than spinning forever through a repeating dataset.
MAX_CONSECUTIVE_SKIPS = 1000
_INDEXED_IMAGE = re.compile(r"^(\d+)\.(" + "|".join(IMAGE_EXTENSIONS) + r")$")


class ImageSize(NamedTuple):
    """The upright size of a decoded image, all `_tile_count` needs (what a pre-encoded sample keeps of it)."""

    width: int
    height: int


def _image_list(images) -> list:
    """The images of a sample as a list: None -> [], one byte string -> [it]."""
    return [] if images is None else [images] if isinstance(images, (bytes, bytearray)) else list(images)


def decode_text_field(key: str, data: bytes):
    """webdataset decoding handler: `.txt` / `.text` fields -> str, `.json` -> the JSON value; None (keep the raw
    bytes) for anything else, images included."""
    extension = key.rsplit(".", 1)[-1].lower()
    if extension in ("txt", "text"):
        return data.decode("utf-8")
    if extension in ("json", "jsn"):
        return json.loads(data)
    return None


class TextFieldDecoder(SampleDecoder):
    """energon's sample decoder limited to text and JSON fields: images stay raw bytes for titanmm's own
    `load_image` (used for crude and typed samples, e.g. a CaptioningSample's `txt` caption and `jpg` image)."""

    def __init__(self):
        super().__init__()
        self._config = {"decode": "txt / json fields; images raw"}
        self._decoder = webdataset.autodecode.Decoder([decode_text_field], pre=[], post=[], partial=True)


@edataclass
class ConversationSample(Sample):
    """A cooked LLaVA sample: chat turns ({"role", "content"}) and the raw bytes of its images, in order."""

    conversation: list
    images: list


def image_files(sample: dict) -> list[bytes]:
    """Image bytes of a crude WebDataset sample: `0.jpg`, `1.png`, ... in index order, else one `jpg` / `png` / ...."""
    indexed = sorted((int(m.group(1)), key) for key in sample if isinstance(key, str)
                     and (m := _INDEXED_IMAGE.match(key)))
    if indexed:
        return [sample[key] for _, key in indexed]
    return [sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample][:1]


def llava_turns(conversations: list, num_images: int | bool, placeholder: str = DEFAULT_PLACEHOLDER) -> list[dict]:
    """LLaVA `conversations` -> titanmm chat turns; adds one placeholder per image when the text has none."""
    turns = []
    for i, turn in enumerate(conversations):
        role = LLAVA_ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"turn {i}: unknown LLaVA role {turn.get('from')!r}")
        turns.append({"role": role, "content": turn["value"]})
    if num_images and not any(placeholder in t["content"] for t in turns):
        first_user = next((i for i, t in enumerate(turns) if t["role"] == "user"), None)
        if first_user is not None:
            prefix = (placeholder + "\n") * int(num_images)
            turns[first_user] = {"role": "user", "content": prefix + turns[first_user]["content"]}
    return turns


@stateless
@cooker
def cook_llava(sample: dict) -> ConversationSample:
    """Crude WebDataset sample (raw bytes) -> ConversationSample."""
    meta = sample["json"]
    if isinstance(meta, (bytes, bytearray)):
        meta = json.loads(meta.decode("utf-8"))
    images = image_files(sample)
    turns = llava_turns(meta["conversations"], len(images))
    return ConversationSample(**basic_sample_keys(sample), conversation=turns, images=images)


def best_answer(sample: VQASample) -> str:
    """The reply of a VQA sample: the answer of largest weight (the first on ties), else the first answer."""
    answers = sample.answers
    if isinstance(answers, str):
        return answers
    if not answers:
        raise ValueError("the VQA sample has no answer")
    weights = sample.answer_weights
    if weights is not None and len(weights) == len(answers):
        return answers[int(torch.as_tensor(weights).argmax())]
    return answers[0]


def image_config_from_args(image_args, max_tiles: int = 0) -> ImageConfig:
    """The `ImageConfig` of a model's `ImageArgs` (preset, tile size, tiling); `max_tiles` > 0 overrides the
    most tiles per image."""
    config = ImageConfig.preset(image_args.preset)
    size = (image_args.tile_size, image_args.tile_size)
    if image_args.tiling == "none":  # one tile of tile_size (RADIO-style patch-multiple sizing keeps its own)
        if config.resize_mode == PATCH_MULTIPLE:
            return config
        return config.with_(size=size, crop_size=size if config.crop_size is not None else None)
    most = max_tiles if max_tiles > 0 else image_args.max_tiles
    return config.with_(size=size, resize_mode=EXACT, crop_size=None, tiling=image_args.tiling,
                        max_tiles=most, min_tiles=min(image_args.min_tiles, most),
                        use_thumbnail=image_args.use_thumbnail)


def image_layout_from_args(image_args) -> dict:
    """`expand_images` layout keywords (tag_style, use_tile_tags, tile_format) of a model's `ImageArgs`."""
    tags = (image_args.image_start, image_args.image_end)
    styles = {v: k for k, v in IMAGE_TAGS.items()}
    if tags not in styles:
        raise ValueError(f"image_start / image_end {tags} are not a known tag style {sorted(IMAGE_TAGS.values())}")
    layout = {"tag_style": styles[tags], "use_tile_tags": image_args.tile_tags != "none"}
    if image_args.tile_tags == "nemotron":
        layout["tile_format"] = NEMOTRON_TILE_TAG_FORMAT
    elif image_args.tile_tags == "nvlm":
        layout["tile_format"] = TILE_TAG_FORMAT
    return layout


def tile_budgets(max_tiles: int) -> list[int]:
    """Tile budgets to try, largest first: `max_tiles`, then Megatron's smaller ones (12, 8, 6, 4, 2, 1)."""
    return [max_tiles] + [b for b in MEGATRON_TILE_BUDGETS if b < max_tiles]


def fullest_subset(lengths: Sequence[int], candidates: Sequence[int], capacity: int) -> list[int]:
    """The subset of `candidates` (indices into `lengths`, each length in 1..capacity) whose total length is the
    largest that is <= capacity: an exact 0/1 knapsack by subset sums, with a Python int as the bitset of the
    reachable totals. Ties are broken towards the earlier candidates: the subset comes from the shortest prefix of
    `candidates` that reaches the total, and going backwards through that prefix a candidate is left out whenever
    the ones before it can still make up the rest. Returned in candidate order."""
    full = 1 << capacity
    mask = (full << 1) - 1
    reachable = [1]  # reachable[k]: bit t is set when some subset of the first k candidates sums to t
    for i in candidates:
        totals = reachable[-1]
        reachable.append((totals | (totals << lengths[i])) & mask)
        if reachable[-1] & full:  # a full bin: later candidates cannot do better
            break
    total = reachable[-1].bit_length() - 1
    chosen = []
    for k in range(len(reachable) - 2, -1, -1):
        if not (reachable[k] >> total) & 1:  # the total needs candidate k
            chosen.append(candidates[k])
            total -= lengths[candidates[k]]
    assert total == 0
    return chosen[::-1]


def _check_lengths(lengths: Sequence[int], capacity: int) -> None:
    if any(n > capacity for n in lengths):
        raise ValueError(f"an item of length {max(lengths)} exceeds the capacity {capacity}")
    if any(n < 0 for n in lengths):
        raise ValueError(f"an item has the negative length {min(lengths)}")


def _longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices by decreasing length, ties by increasing index."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def fullest_first_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins of total length <= capacity: each bin, in turn, is the subset of the items
    left with the largest total that fits (`fullest_subset` over the items longest first; "minimum bin slack"
    bin packing), so all but the last bins are (nearly) full. Items of length 0 go to the first bin."""
    _check_lengths(lengths, capacity)
    order = [i for i in _longest_first(lengths) if lengths[i] > 0]
    bins = []
    while order:
        chosen = order if sum(lengths[i] for i in order) <= capacity else fullest_subset(lengths, order, capacity)
        taken = set(chosen)
        order = [i for i in order if i not in taken]
        bins.append(chosen)
    empty = [i for i in range(len(lengths)) if lengths[i] == 0]
    if empty:
        bins = [bins[0] + empty] + bins[1:] if bins else [empty]
    return bins


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` in bins of total length <= capacity by first-fit decreasing: items longest first,
    each into the first bin with room (the same bins as filling one bin at a time with the longest item that
    still fits)."""
    _check_lengths(lengths, capacity)
    bins, room = [], []
    for i in _longest_first(lengths):
        k = next((k for k, r in enumerate(room) if lengths[i] <= r), len(bins))
        if k == len(bins):
            bins.append([])
            room.append(capacity)
        bins[k].append(i)
        room[k] -= lengths[i]
    return bins


def greedy_knapsack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= capacity, the fullest bins first.

    `fullest_first_bins` (an exact knapsack per bin), unless first-fit decreasing needs fewer bins (rare inputs
    only). Filling each bin most packs much tighter than first-fit decreasing when the items are a sixth to a third
    of the capacity, as image-text samples are: first-fit decreasing leaves a few hundred tokens free in most bins.
    On LLaVA-665K-like SFT lengths in bins of 4096, the bins of 32-item buffers are 93.2% full instead of 87.8%,
    of 96-item buffers 97.0% instead of 92.5% (benchmarks/vlm_packing.py). Deterministic; every index is in
    exactly one bin; within a bin the items are in decreasing length (ties: increasing index). Cost:
    O(bins * items * capacity / 64) machine-word operations (~1 ms for 128 items at capacity 4096).
    """
    fullest = fullest_first_bins(lengths, capacity)
    fitted = first_fit_decreasing(lengths, capacity)
    return fitted if len(fitted) < len(fullest) else fullest


class VLMTaskEncoder(DefaultTaskEncoder[Sample, dict, dict, dict]):
    """Image-text samples -> padded (optionally packed) micro-batches (see the module docstring).

    Args:
        tokenizer: titanmm tokenizer (with `token_to_id` for the chat template's special tokens).
        chat_template: a `ChatTemplate` or its name ("llama3", "chatml", "nvlm-yi-34b", "plain", ...).
        image_args: the model's `ImageArgs` (preset, tile size, tiling rule, max tiles, thumbnail, tags).
        image_token_id: the image token id (also used as the placeholder id during encoding).
        tokens_per_tile: image tokens per tile (`prompts.tokens_per_image`).
        seq_len: model input length; a sample has at most seq_len + 1 tokens before the next-token shift, and
            a packed sequence at most seq_len input tokens.
        task: "sft" or "captioning".
        max_tiles: most tiles per image; 0 keeps `image_args.max_tiles`.
    """

    cookers = [Cooker(cook_llava)]
    decoder = TextFieldDecoder()  # images stay raw bytes: titanmm decodes them itself
    #: With a packing buffer: buffer pre-encoded samples (tokens, tile counts, image bytes) and make the pixels of
    #: the samples of each pack as energon emits it. False: buffer fully encoded samples, pixels included (the
    #: same batches; each image decoded once instead of twice, but the pixels of the whole buffer in memory).
    defer_pixels_when_packing: bool = True
    _split_encoding = False  # True while a dataset with a packing buffer is built (see `_is_overridden`)

    def __init__(self, tokenizer, chat_template, image_args, image_token_id: int, tokens_per_tile: int, seq_len: int,
                 *, task: str = "sft", max_tiles: int = 0):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.tokenizer = tokenizer
        self.chat_template = get_chat_template(chat_template)
        self.image_args = image_args
        self.image_config = image_config_from_args(image_args, max_tiles)
        self.layout = image_layout_from_args(image_args)
        self.image_token_id = image_token_id
        self.tokens_per_tile = tokens_per_tile
        self.seq_len = seq_len
        self.task = task
        self.pad_id = tokenizer.pad_id if getattr(tokenizer, "pad_id", None) is not None else 0
        self.skipped: Counter = Counter()
        self._unreported: Counter = Counter()
        self._consecutive_skips = 0

    # -- helpers ------------------------------------------------------------------------------

    def _skip(self, reason: str, key: str, detail: str) -> SkipSample:
        self.skipped[reason] += 1
        self._unreported[reason] += 1
        self._consecutive_skips += 1
        logger.warning("skipping sample %s (%s): %s [skipped so far: %s]", key, reason, detail, dict(self.skipped))
        if self._consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise RuntimeError(f"the last {self._consecutive_skips} samples were all skipped (skipped so far: "
                               f"{dict(self.skipped)}); check the data against seq_len, the chat template and the task")
        return SkipSample(f"{key}: {reason}: {detail}")

    def _tile_count(self, image, max_tiles: int) -> int:
        config = self.image_config
        if config.tiling == "none":
            return 1
        return num_tiles_for(image.width, image.height, config.size[0], config.min_tiles, max_tiles,
                             config.use_thumbnail, config.tiling)

    def pixels(self, image, max_tiles: int) -> torch.Tensor:
        """[N, 3, H, W] tiles of a decoded image with at most `max_tiles` grid tiles."""
        if self.image_config.tiling == "none":
            return preprocess_single(image, self.image_config).unsqueeze(0)
        return preprocess_tiles(image, self.image_config, max_tiles)

    def _tile_shape(self) -> tuple[int, int]:
        config = self.image_config
        if config.crop_size is not None:
            return tuple(config.crop_size)
        return tuple(config.size)

    def _decode(self, images: list, key: str, keep_pixels: bool = True) -> list:
        """The images decoded (`load_image`), or with keep_pixels=False only their upright sizes (`ImageSize`, the
        pixels dropped at once): a corrupt or too large image is the same counted skip either way."""
        decoded = []
        for data in images:
            try:
                image = load_image(data)
            except ImageTooLargeError as e:
                raise self._skip("image_too_large", key, str(e)) from e
            except ImageDecodeError as e:
                raise self._skip("corrupt_image", key, str(e)) from e
            decoded.append(image if keep_pixels else ImageSize(image.width, image.height))
        return decoded

    def _tiles(self, decoded: list, budget: int | None, counts: list[int], key: str) -> torch.Tensor:
        """[tiles, 3, H, W]: the tiles of the decoded images for the chosen budget, checked against `counts`."""
        if not decoded:
            return torch.zeros(0, 3, *self._tile_shape())
        tiles = [self.pixels(image, budget) for image in decoded]
        made = [t.shape[0] for t in tiles]
        if made != counts:
            raise AssertionError(f"{key}: {made} tiles made, {counts} expected")
        return torch.cat(tiles)

    def sample_turns(self, sample: Sample) -> tuple[list[dict] | None, str | None, str | None, list]:
        """(turns, caption prompt, caption, image bytes) of a sample for this task: turns for "sft", prompt and
        caption for "captioning" (the other entries None)."""
        if isinstance(sample, ConversationSample):
            turns, images = sample.conversation, sample.images
        elif isinstance(sample, CaptioningSample):
            turns, images = [{"role": "assistant", "content": sample.caption}], [sample.image]
        elif isinstance(sample, VQASample):
            context = sample.context if DEFAULT_PLACEHOLDER in sample.context else \
                DEFAULT_PLACEHOLDER + "\n" + sample.context
            turns = [{"role": "user", "content": context}, {"role": "assistant", "content": best_answer(sample)}]
            images = [sample.image]
        else:  # a dataset of another sample type: a setup error, not a bad sample
            raise TypeError(f"{sample.__key__}: {type(sample).__name__} samples are not supported; the encoder takes "
                            "LLaVA conversations (CrudeWebdataset, see convert_llava), CaptioningSample and VQASample")
        if self.task == "sft" and not isinstance(sample, CaptioningSample):
            return turns, None, None, images
        replies = [t["content"] for t in turns if t["role"] == "assistant"]
        if len(replies) != 1:
            raise self._skip("not_a_caption", sample.__key__, f"{len(replies)} assistant replies; captioning "
                             "learns exactly one")
        return None, (DEFAULT_PLACEHOLDER + "\n") * len(images), replies[0].strip(), images

    def encode(self, turns: list | None, images, key: str = "<sample>", *, caption: tuple[str, str] | None = None
               ) -> dict:
        """Encode a conversation (or a (prompt, caption) pair) with its images (raw bytes: one, a list, or None).

        Returns {"input_ids", "labels", "pixel_values" [tiles, 3, H, W], "num_tiles" [images]}; raises
        SkipSample for a corrupt image, a placeholder / image count mismatch, no learned token or a sample
        that does not fit in seq_len + 1 tokens with one tile per image.
        """
        images = _image_list(images)
        out, counts, decoded, budget = self._encode_tokens(turns, images, key, caption, keep_pixels=True)
        out["pixel_values"] = self._tiles(decoded, budget, counts, key)
        out["num_tiles"] = torch.tensor(counts, dtype=torch.long)
        return out

    def preencode(self, turns: list | None, images, key: str = "<sample>", *,
                  caption: tuple[str, str] | None = None) -> dict:
        """`encode` without the pixels: the same tokens, tile counts and skips (every image is decoded, to check
        it and to know its size, and dropped at once), plus the image bytes ("images") and the tile budget
        ("tile_budget") that `add_pixels` makes the same "pixel_values" from."""
        images = _image_list(images)
        out, counts, _, budget = self._encode_tokens(turns, images, key, caption, keep_pixels=False)
        out["num_tiles"] = torch.tensor(counts, dtype=torch.long)
        out["images"] = images
        out["tile_budget"] = budget
        return out

    def add_pixels(self, sample: dict) -> dict:
        """A `preencode`d sample with its "pixel_values" made (the images decoded again: the same bytes give the
        same pixels) in place of "images" / "tile_budget"; a new dict, the other entries shared. (Should decoding
        fail now, e.g. out of memory, the sample is a counted skip and energon leaves it out of its pack.)"""
        key = sample["__keys__"][0] if "__keys__" in sample else "<sample>"
        out = {k: v for k, v in sample.items() if k not in ("images", "tile_budget")}
        decoded = self._decode(sample["images"], key)
        out["pixel_values"] = self._tiles(decoded, sample["tile_budget"], sample["num_tiles"].tolist(), key)
        return out

    def _encode_tokens(self, turns: list | None, images: list, key: str, caption: tuple[str, str] | None,
                       keep_pixels: bool) -> tuple[dict, list[int], list, int | None]:
        """({"input_ids", "labels"}, tiles per image, the decoded images (or their sizes), the tile budget chosen:
        None without images) of a sample; raises the counted SkipSample of `encode`."""
        if caption is not None:
            prompt, text = caption
            ids, mask = encode_caption(text, prompt, self.tokenizer, self.chat_template,
                                       image_token_id=self.image_token_id)
            num_placeholders = prompt.count(DEFAULT_PLACEHOLDER)
        else:
            ids, mask = encode_conversation(turns, self.tokenizer, self.chat_template,
                                            image_token_id=self.image_token_id)
            num_placeholders = sum(t["content"].count(DEFAULT_PLACEHOLDER) for t in turns)
        if sum(int(i) == self.image_token_id for i in ids) != num_placeholders:
            raise self._skip("image_token_in_text", key, f"the text encodes to the image token id "
                             f"{self.image_token_id}")
        if num_placeholders != len(images):
            raise self._skip("image_mismatch", key, f"{num_placeholders} placeholder(s) for {len(images)} image(s)")
        if not any(mask[1:]):
            raise self._skip("no_learned_tokens", key, "no assistant reply to learn")
        decoded = self._decode(images, key, keep_pixels)
        if not decoded:
            if len(ids) - 1 > self.seq_len:
                raise self._skip("too_long", key, f"{len(ids)} tokens > seq_len + 1 = {self.seq_len + 1}")
            return sft_sample(ids, mask), [], [], None
        budgets = tile_budgets(self.image_config.max_tiles) if self.image_config.tiling != "none" else [1]
        tried = []
        for budget in budgets:
            counts = [self._tile_count(image, budget) for image in decoded]
            expanded, loss_mask = expand_images(ids, mask, self.tokenizer, image_token_id=self.image_token_id,
                                                tokens_per_tile=self.tokens_per_tile, num_tiles=counts, **self.layout)
            tried.append((budget, len(expanded.input_ids)))
            if len(expanded.input_ids) - 1 <= self.seq_len:
                return sft_sample(expanded.input_ids.tolist(), loss_mask.tolist()), counts, decoded, budget
        raise self._skip("too_long", key, f"(max_tiles, tokens) tried: {tried}; seq_len + 1 = {self.seq_len + 1}")

    # -- energon hooks --------------------------------------------------------------------------

    @stateless
    def encode_sample(self, sample: Sample) -> dict:
        """Without packing: the whole encoding, pixels included (`encode`)."""
        turns, prompt, caption, images = self.sample_turns(sample)
        out = self.encode(turns, images, sample.__key__, caption=None if prompt is None else (prompt, caption))
        return self._finish_sample(out, sample)

    @stateless
    def preencode_sample(self, sample: Sample) -> dict:
        """With packing, what enters energon's packing buffer: the sample without its pixels (`preencode`)."""
        turns, prompt, caption, images = self.sample_turns(sample)
        out = self.preencode(turns, images, sample.__key__, caption=None if prompt is None else (prompt, caption))
        return self._finish_sample(out, sample)

    @stateless
    def postencode_sample(self, sample: dict) -> dict:
        """With packing, each sample of a pack as energon emits it: its pixels made (`add_pixels`)."""
        return self.add_pixels(sample)

    def _finish_sample(self, out: dict, sample: Sample) -> dict:
        self._consecutive_skips = 0
        out["__keys__"] = [sample.__key__]
        out["__restore_key__"] = sample.__restore_key__  # energon re-creates buffered samples from it on resume
        out["document_lengths"] = [len(out["input_ids"])]
        return out

    # energon builds its pipeline from the sample hooks that a task encoder overrides (`_is_overridden`, asked
    # only while building): one `encode_sample` map, or a `preencode_sample` map before the packing buffer and
    # `postencode_sample` on each emitted pack (without packing energon would map it right after
    # `preencode_sample`). This encoder has all three, so it shows energon the pair while a dataset with a
    # packing buffer is built and `encode_sample` otherwise: the pipeline without packing is the one-step one.

    def build_train_datasets(self, *, packing_buffer_size: int | None = None, **kwargs):
        with self._building(packing_buffer_size):
            return super().build_train_datasets(packing_buffer_size=packing_buffer_size, **kwargs)

    def build_val_datasets(self, *, packing_buffer_size: int | None = None, **kwargs):
        with self._building(packing_buffer_size):
            return super().build_val_datasets(packing_buffer_size=packing_buffer_size, **kwargs)

    @contextmanager
    def _building(self, packing_buffer_size: int | None):
        self._split_encoding = packing_buffer_size is not None and self.defer_pixels_when_packing
        try:
            yield
        finally:
            self._split_encoding = False

    def _is_overridden(self, bound_method, bases=None) -> bool:
        name = getattr(bound_method, "__name__", None)
        if name in ("encode_sample", "preencode_sample", "postencode_sample") \
                and getattr(bound_method, "__self__", None) is self:
            return self._split_encoding != (name == "encode_sample")
        return super()._is_overridden(bound_method, bases)

    def select_samples_to_pack(self, samples: list[dict]) -> list[list[dict]]:
        """The buffered samples grouped into sequences of at most seq_len tokens, fullest first
        (`greedy_knapsack`); every sample is in exactly one group (energon drops samples left out)."""
        bins = greedy_knapsack([len(s["input_ids"]) for s in samples], self.seq_len)
        return [[samples[i] for i in group] for group in bins]

    @stateless
    def pack_selected_samples(self, samples: list[dict]) -> dict:
        """One packed sample: the samples' tokens, labels and tiles concatenated, with their lengths."""
        return {
            "__keys__": [k for s in samples for k in s["__keys__"]],
            "__restore_key__": (),  # energon sets it
            "input_ids": torch.cat([s["input_ids"] for s in samples]),
            "labels": torch.cat([s["labels"] for s in samples]),
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "num_tiles": torch.cat([s["num_tiles"] for s in samples]),
            "document_lengths": [n for s in samples for n in s["document_lengths"]],
        }

    @stateless
    def batch(self, samples: list[dict]) -> dict:
        """Pad to seq_len (input_ids with the pad id, labels with -100; in a packed row the padding is one more
        document), number the documents of each row, restart positions at each, concatenate all tiles; attach
        the skip counts."""
        size = (len(samples), self.seq_len)
        input_ids = torch.full(size, self.pad_id, dtype=torch.long)
        labels = torch.full(size, IGNORE_INDEX, dtype=torch.long)
        document_ids = torch.zeros(size, dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            if n > self.seq_len:
                raise AssertionError(f"{sample['__keys__']}: {n} tokens exceed seq_len {self.seq_len}")
            input_ids[row, :n] = sample["input_ids"]
            labels[row, :n] = sample["labels"]
            lengths = sample["document_lengths"]
            if len(lengths) > 1:  # packed: 0, 0, 1, 1, 1, ...; padding gets the next id
                document_ids[row, :n] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
                document_ids[row, n:] = len(lengths)
        skipped, self._unreported = dict(self._unreported), Counter()
        return {
            "__keys__": [k for s in samples for k in s["__keys__"]],
            "__restore_key__": (),  # energon sets it
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": torch.stack([positions_within_documents(d) for d in document_ids]),
            "document_ids": document_ids,
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "num_tiles": torch.cat([s["num_tiles"] for s in samples]),
            "images_per_sample": torch.tensor([len(s["num_tiles"]) for s in samples], dtype=torch.long),
            "tiles_per_sample": torch.tensor([s["pixel_values"].shape[0] for s in samples], dtype=torch.long),
            "num_tokens": torch.tensor([len(s["input_ids"]) for s in samples], dtype=torch.long),
            "skipped": skipped,
        }

    @stateless
    def encode_batch(self, batch: dict) -> dict:
        return batch
