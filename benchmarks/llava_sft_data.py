"""A synthetic LLaVA SFT dataset with LLaVA-665K-like lengths, for the SFT side-by-side (benchmarks/compare.py
workload `llava_mistral_clip336_sft`): LLaVA-Instruct JSON + JPEG images, converted for energon, and the same
samples tokenized for the transformers peer (benchmarks/hf_llava_sft.py).

    python benchmarks/llava_sft_data.py OUT [--samples 2000] [--seq-len 4096] [--seed 0] [--workers N] [--force]

    from llava_sft_data import build_llava_sft_dataset     # (benchmarks/ on sys.path)
    stats = build_llava_sft_dataset(Path(OUT), samples=2000, seq_len=4096)

Writes, under OUT:

* `images/img_NNNNN.jpg`: `--unique-images` 640x480 JPEGs (a colour gradient with a few random shapes, seeded;
  like LLaVA-665K, where many conversations share a COCO image, samples draw their image from this pool);
* `llava_sft.json`: the samples as LLaVA-Instruct records (`{"id", "image"?, "conversations": [{"from": "human" |
  "gpt", "value"}, ...]}`, the image's `"<image>\\n"` placeholder in front of the first question);
* `energon/`: that JSON converted by titanmm's own converter (`titanmm.data.convert_llava`: WebDataset shards +
  `energon prepare`), what titanmm trains on (`--training.dataset=OUT/energon`);
* `hf_samples.npz`: each sample as titanmm's `VLMTaskEncoder.encode` makes it (the shipped tokenizer, chat
  template "plain", the image expanded to 576 image tokens), in the JSON's order, for the peer:
  `input_ids` (int32, all samples concatenated; each sample is its unshifted ids, i.e. titanmm's input_ids plus
  the last target, so that transformers' internal label shift trains exactly titanmm's targets), `targets`
  (bool, the same layout: True where the token is a learned target, i.e. the label is the token itself),
  `offsets` [N + 1], `image_paths` (relative to OUT) with `image_offsets` [N + 1], `keys`, and
  `image_token_id` (titanmm's id of the image tokens in `input_ids`: the peer maps it to its own),
  `tokens_per_image`, `seq_len`;
* `stats.json` (written last; a later call with the same parameters reuses OUT): the parameters, the length
  statistics and the conversion counts.

Lengths. A sample's length is what titanmm's encoder makes of it, len(input_ids) = image tokens + text tokens
(chat template included) - 1 (the next-token shift). Lengths, parts and image counts are drawn by
`benchmarks/vlm_packing.py`'s `sample_lengths` from its `llava_665k_sft` mixture (LLaVA-1.5's mix665k parts and
sizes, text-length models per part: multi-turn short-answer VQA, GPT-4 conversations and descriptions, 6%
text-only ShareGPT conversations with a long tail; see that module), so the packing benchmark and this dataset
share one distribution. Samples longer than `--seq-len` (0.17% at 4096, all ShareGPT) are not written (titanmm
would skip them as too long and the peer would have to truncate them); the next draws take their place.

Text. Each part has a conversation shape (`CONVERSATION_SHAPES`: tokens per question-answer round and the
answer's share of a round; short-answer VQA, multiple-choice, caption and region parts: the middle of their
per-round range in vlm_packing (25-60 tokens), a fifth of it the answer; GPT-4 conversations: ~70 a round;
descriptions and reasoning: one long answer; ShareGPT: ~300 a round). The words are common English words that the
tokenizer encodes as one token each (" the", " value", ...; none encodes to the image token id). The encoded
sample is then made exactly the drawn length: the last answer lengthened, or the longest texts shortened.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from vlm_packing import IMAGE_TOKENS, LLAVA_665K_SFT, Turns, sample_lengths  # noqa: E402

FORMAT_VERSION = 1  # bump when what is written changes: a cached OUT of another version is rebuilt
FLAVOR = "llava_mistral_7b_clip336"
CHAT_TEMPLATE = "plain"  # needs no special tokens: works with the shipped tokenizer and the flavor's vocabulary
IMAGE_SIZE = (640, 480)
IMAGES_DIR, JSON_NAME, ENERGON_DIR, PEER_FILE, STATS_NAME = "images", "llava_sft.json", "energon", \
    "hf_samples.npz", "stats.json"

# Conversation shape of each part: (text tokens per question-answer round, or None for a single round; the
# answer's share of a round's words). Short-answer VQA parts (vlm_packing's `Turns` models) take the middle of
# their per-round range.
CONVERSATION_SHAPES = {
    "llava_instruct_conversation": (70, 0.7),  # GPT-4 conversations of 2-4 rounds
    "llava_instruct_detail": (None, 0.85),  # one question, a detailed description
    "llava_instruct_reasoning": (None, 0.8),  # one question, a reasoned answer
    "sharegpt": (300, 0.75),  # text-only chat
}
SHORT_ANSWER_SHARE = 0.2  # VQA-style rounds: a question and a word or phrase

WORDS = """the a an of in on at to with from by for and or but not is are was were be been has have this that these
those it its there which where when how man child table field sign text left right back next between group number
two some each other first second last one also more most only about into over under after before while value
object function list string name type data file line time set new used call return default class method module
argument instance key path code state form option error test case result output input source""".split()


# ---------------------------------------------------------------------------------------------------------------
# Drawing the samples
# ---------------------------------------------------------------------------------------------------------------

def draw_lengths(samples: int, seq_len: int, seed: int) -> list[tuple[str, int, int]]:
    """(part name, images, length) of `samples` samples drawn from the llava_665k_sft mixture, dropping those
    longer than `seq_len` (length = titanmm's len(input_ids), see the module docstring)."""
    draws = samples + samples // 16 + 64
    while True:
        lengths, which = sample_lengths(LLAVA_665K_SFT, draws, seed)
        kept = [(LLAVA_665K_SFT[k].name, LLAVA_665K_SFT[k].images, int(n)) for n, k in zip(lengths, which)
                if n <= seq_len]
        if len(kept) >= samples:
            return kept[:samples]
        draws *= 2


def single_token_words(tokenizer) -> list[str]:
    """The words of WORDS that the tokenizer encodes as one token after a space (all of WORDS if too few do)."""
    words = [w for w in WORDS if len(tokenizer.encode(" " + w)) == 1]
    return words if len(words) >= 20 else list(WORDS)


def conversation_shape(part: str) -> tuple[float | None, float]:
    """(tokens per round or None, answer share) of a part (see CONVERSATION_SHAPES)."""
    if part in CONVERSATION_SHAPES:
        return CONVERSATION_SHAPES[part]
    model = next(p.text for p in LLAVA_665K_SFT if p.name == part)
    if isinstance(model, Turns):
        return (model.low + model.high) / 2, SHORT_ANSWER_SHARE
    return None, 0.8


class ConversationMaker:
    """LLaVA conversations whose titanmm encoding has an exact length."""

    def __init__(self, tokenizer, chat_template: str, image_token_id: int, tokens_per_image: int):
        from titanmm.data.chat import encode_conversation
        from titanmm.data.energon import llava_turns

        self.tokenizer, self.template = tokenizer, chat_template
        self.image_token_id, self.tokens_per_image = image_token_id, tokens_per_image
        self.words = single_token_words(tokenizer)
        self._encode, self._turns = encode_conversation, llava_turns

    def encoded_length(self, conversations: list[dict], images: int) -> int:
        """len(ids) of the sample as titanmm encodes it, images expanded (before the next-token shift)."""
        ids, _ = self._encode(self._turns(conversations, images), self.tokenizer, self.template,
                              image_token_id=self.image_token_id)
        return len(ids) + images * (self.tokens_per_image - 1)

    def _text(self, rng: np.random.Generator, words: int) -> str:
        return " ".join(rng.choice(self.words, size=max(1, words)))

    def make(self, rng: np.random.Generator, part: str, images: int, length: int) -> tuple[list[dict], int]:
        """(conversations, encoded length) of a sample of `part` with `images` images whose encoding has
        `length` + 1 ids (the drawn length before the shift) when reachable (else the closest one)."""
        target = length + 1
        text_tokens = target - images * self.tokens_per_image  # bos, words, newlines, eos
        per_round, answer_share = conversation_shape(part)
        rounds = 1 if per_round is None else int(np.clip(round(text_tokens / per_round), 1, 30))
        overhead = 1 + 2 * images + 2 * rounds  # bos, placeholder + "\n" per image, "\n" + eos per round
        while rounds > 1 and text_tokens - overhead < 2 * rounds:
            rounds, overhead = rounds - 1, overhead - 2
        words = max(2 * rounds, text_tokens - overhead)
        per_round_words = rng.multinomial(words - 2 * rounds, np.full(rounds, 1 / rounds)) + 2
        questions = [max(1, round(w * (1 - answer_share))) for w in per_round_words]
        answers = [max(1, w - q) for w, q in zip(per_round_words, questions)]
        texts = [[self._text(rng, q), self._text(rng, a)] for q, a in zip(questions, answers)]
        prefix = "<image>\n" * images

        def build():
            conv = []
            for i, (q, a) in enumerate(texts):
                conv += [{"from": "human", "value": (prefix if i == 0 else "") + q}, {"from": "gpt", "value": a}]
            return conv

        conversations = build()
        n = self.encoded_length(conversations, images)
        best = (abs(n - target), conversations, n)
        for _ in range(8):  # lengthen the last answer / shorten the longest texts by the difference
            if n == target:
                break
            if n < target:
                texts[-1][1] += " " + self._text(rng, target - n)
            else:
                slots = [text.split(" ") for pair in texts for text in pair]
                for _ in range(n - target):
                    longest = max(range(len(slots)), key=lambda k: len(slots[k]))
                    if len(slots[longest]) == 1:
                        break
                    slots[longest].pop()
                texts = [[" ".join(slots[2 * k]), " ".join(slots[2 * k + 1])] for k in range(len(texts))]
            conversations = build()
            n = self.encoded_length(conversations, images)
            if abs(n - target) < best[0]:
                best = (abs(n - target), conversations, n)
        return best[1], best[2]


def make_image(rng: np.random.Generator, size: tuple[int, int] = IMAGE_SIZE) -> bytes:
    """JPEG bytes of a `size` (width, height) image: a two-colour gradient and a few random shapes."""
    from PIL import Image, ImageDraw

    width, height = size
    a, b = rng.integers(0, 256, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, width)[None, :, None] * np.ones((height, 1, 1))
    pixels = (a * (1 - ramp) + b * ramp).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(rng.integers(0, width, size=2))
        y0, y1 = sorted(rng.integers(0, height, size=2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1 + 1, y1 + 1], fill=colour)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# titanmm's encoding of the samples, for the peer
# ---------------------------------------------------------------------------------------------------------------

_ENCODER = None


def _encoder_init(tokenizer_path: str, chat_template: str, flavor: str, seq_len: int) -> None:
    global _ENCODER
    from titanmm.data.energon import VLMTaskEncoder
    from titanmm.data.tokenizer import build_tokenizer
    from titanmm.models import get_model_spec

    args = get_model_spec("vlm").flavors[flavor]
    _ENCODER = VLMTaskEncoder(build_tokenizer(tokenizer_path), chat_template, args.image, args.image_token_id,
                              IMAGE_TOKENS, seq_len)


def _pool_init(*init) -> None:
    """A pool worker: one thread for torch (the pool is the parallelism), then the encoder."""
    import torch

    torch.set_num_threads(1)
    _encoder_init(*init)


def _encode_record(job: tuple[dict, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(unshifted ids, learned-target mask) of one record, through `VLMTaskEncoder.encode` with its images."""
    from titanmm.data.energon import llava_turns
    from titanmm.data.packed import IGNORE_INDEX

    record, image_files = job
    images = [Path(f).read_bytes() for f in image_files]
    out = _ENCODER.encode(llava_turns(record["conversations"], len(images)), images, record["id"])
    input_ids, labels = out["input_ids"].tolist(), out["labels"].tolist()
    if labels[-1] == IGNORE_INDEX:
        raise ValueError(f"{record['id']}: the last token is not learned; its id cannot be recovered")
    ids = np.array(input_ids + [labels[-1]], dtype=np.int32)
    targets = np.array([False] + [label != IGNORE_INDEX for label in labels], dtype=bool)
    return ids, targets


def encode_records(records: list[dict], root: Path, tokenizer_path: str, chat_template: str, flavor: str,
                   seq_len: int, workers: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """`_encode_record` of every record, in order (a process pool when `workers` > 1)."""
    jobs = [(r, [str(root / IMAGES_DIR / r["image"])] if "image" in r else []) for r in records]
    init = (tokenizer_path, chat_template, flavor, seq_len)
    if workers <= 1:
        _encoder_init(*init)
        return [_encode_record(job) for job in jobs]
    with ProcessPoolExecutor(workers, initializer=_pool_init, initargs=init) as pool:
        return list(pool.map(_encode_record, jobs, chunksize=max(1, len(jobs) // (8 * workers))))


def write_peer_file(path: Path, records: list[dict], encoded: list[tuple[np.ndarray, np.ndarray]],
                    image_token_id: int, seq_len: int) -> None:
    lengths = [len(ids) for ids, _ in encoded]
    image_lists = [[f"{IMAGES_DIR}/{r['image']}"] if "image" in r else [] for r in records]
    np.savez_compressed(
        path,
        input_ids=np.concatenate([ids for ids, _ in encoded]),
        targets=np.concatenate([t for _, t in encoded]),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        image_paths=np.array([p for paths in image_lists for p in paths], dtype=str),
        image_offsets=np.concatenate([[0], np.cumsum([len(p) for p in image_lists])]).astype(np.int64),
        keys=np.array([r["id"] for r in records], dtype=str),
        image_token_id=np.int64(image_token_id), tokens_per_image=np.int64(IMAGE_TOKENS), seq_len=np.int64(seq_len))


def load_peer_file(path: Path) -> dict:
    """hf_samples.npz as {"samples": [(ids, targets, image paths)], "image_token_id", "tokens_per_image",
    "seq_len"} (image paths relative to the dataset folder)."""
    with np.load(path) as f:
        ids, targets, offsets = f["input_ids"], f["targets"], f["offsets"]
        paths, image_offsets = f["image_paths"].tolist(), f["image_offsets"]
        samples = [(ids[offsets[i]:offsets[i + 1]], targets[offsets[i]:offsets[i + 1]],
                    paths[image_offsets[i]:image_offsets[i + 1]]) for i in range(len(offsets) - 1)]
        return {"samples": samples, "keys": f["keys"].tolist(), "image_token_id": int(f["image_token_id"]),
                "tokens_per_image": int(f["tokens_per_image"]), "seq_len": int(f["seq_len"])}


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------

def padding_efficiency(lengths: np.ndarray, batch: int) -> float:
    """Non-pad fraction when consecutive samples (file order) form batches of `batch` padded to their longest."""
    usable = len(lengths) // batch * batch
    if usable == 0:
        return float("nan")
    rows = lengths[:usable].reshape(-1, batch)
    return float(rows.sum() / (rows.max(axis=1) * batch).sum())


def length_stats(records: list[dict], parts: list[str], encoded: list[tuple[np.ndarray, np.ndarray]],
                 seq_len: int) -> dict:
    """Length statistics of the written samples (lengths as titanmm counts them: unshifted ids - 1)."""
    lengths = np.array([len(ids) - 1 for ids, _ in encoded])
    learned = np.array([int(t.sum()) for _, t in encoded])
    images = np.array([1 if "image" in r else 0 for r in records])
    rounds = np.array([len(r["conversations"]) // 2 for r in records])
    names = sorted(set(parts))
    return {
        "samples": len(records),
        "mean_length": round(float(lengths.mean()), 1),
        "length_p5_p50_p95_p99_max": [int(v) for v in np.percentile(lengths, [5, 50, 95, 99, 100]).round()],
        "total_tokens": int(lengths.sum()),
        "image_tokens_fraction": round(float((images * IMAGE_TOKENS).sum() / lengths.sum()), 4),
        "learned_tokens_fraction": round(float(learned.sum() / lengths.sum()), 4),
        "text_only_fraction": round(float((images == 0).mean()), 4),
        "mean_rounds": round(float(rounds.mean()), 2),
        "padding_efficiency_by_batch": {str(b): round(padding_efficiency(lengths, b), 4) for b in (1, 2, 4, 8, 16)},
        "samples_per_packed_row_bound": round(seq_len / float(lengths.mean()), 2),
        "parts": {name: {"samples": int(sum(p == name for p in parts)),
                         "mean_length": round(float(np.mean([n for n, p in zip(lengths, parts) if p == name])), 1)}
                  for name in names},
    }


# ---------------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------------

def build_llava_sft_dataset(output: Path, samples: int = 2000, seq_len: int = 4096, seed: int = 0,
                            unique_images: int = 500, workers: int | None = None, tokenizer_path: str = "",
                            flavor: str = FLAVOR, chat_template: str = CHAT_TEMPLATE, shard_size: int = 250,
                            force: bool = False, log=print) -> dict:
    """Build (or reuse) the dataset in `output` (see the module docstring); returns the contents of stats.json."""
    from titanmm.data.convert_llava import convert
    from titanmm.data.tokenizer import build_tokenizer
    from titanmm.models import get_model_spec

    output = Path(output)
    params = {"version": FORMAT_VERSION, "samples": samples, "seq_len": seq_len, "seed": seed,
              "unique_images": unique_images, "image_size": list(IMAGE_SIZE), "tokenizer_path": tokenizer_path,
              "flavor": flavor, "chat_template": chat_template, "distribution": "vlm_packing.llava_665k_sft"}
    stats_path = output / STATS_NAME
    if stats_path.is_file() and not force:
        try:
            cached = json.loads(stats_path.read_text())
        except json.JSONDecodeError:
            cached = {}
        if cached.get("params") == params:
            log(f"{output}: cached dataset with the same parameters")
            return cached
    if output.exists():
        shutil.rmtree(output)
    (output / IMAGES_DIR).mkdir(parents=True)
    workers = workers if workers is not None else min(16, os.cpu_count() or 1)
    started = time.perf_counter()

    args = get_model_spec("vlm").flavors[flavor]
    tokenizer = build_tokenizer(tokenizer_path)
    maker = ConversationMaker(tokenizer, chat_template, args.image_token_id, IMAGE_TOKENS)
    rng = np.random.default_rng(seed + 1)  # the lengths use `seed` itself (vlm_packing.sample_lengths)
    pool = min(unique_images, samples)
    for i in range(pool):
        (output / IMAGES_DIR / f"img_{i:05d}.jpg").write_bytes(make_image(rng))
    drawn = draw_lengths(samples, seq_len, seed)
    records, parts, mismatched = [], [], 0
    for i, (part, images, length) in enumerate(drawn):
        conversations, encoded_length = maker.make(rng, part, images, length)
        mismatched += encoded_length != length + 1
        record = {"id": f"sft{i:06d}", "conversations": conversations}
        if images:
            record["image"] = f"img_{int(rng.integers(pool)):05d}.jpg"
        records.append(record)
        parts.append(part)
    (output / JSON_NAME).write_text(json.dumps(records))
    made = time.perf_counter()

    conversion = convert(output / JSON_NAME, output / IMAGES_DIR, output / ENERGON_DIR, shard_size=shard_size,
                         verify_images=False, num_workers=max(1, workers), progress=False)
    converted = time.perf_counter()
    encoded = encode_records(records, output, tokenizer_path, chat_template, flavor, seq_len, workers)
    too_long = [r["id"] for r, (ids, _) in zip(records, encoded) if len(ids) - 1 > seq_len]
    if too_long:
        raise RuntimeError(f"{len(too_long)} samples exceed seq_len {seq_len} (e.g. {too_long[:3]})")
    write_peer_file(output / PEER_FILE, records, encoded, args.image_token_id, seq_len)
    stats = {"params": params, "lengths": length_stats(records, parts, encoded, seq_len),
             "length_mismatches": mismatched, "conversion": conversion,
             "seconds": {"samples_and_images": round(made - started, 2), "energon": round(converted - made, 2),
                         "peer_encoding": round(time.perf_counter() - converted, 2)}}
    stats_path.write_text(json.dumps(stats, indent=1) + "\n")
    log(f"{output}: {samples} samples, mean length {stats['lengths']['mean_length']}, "
        f"p5/p50/p95/p99/max {stats['lengths']['length_p5_p50_p95_p99_max']}, "
        f"{100 * stats['lengths']['text_only_fraction']:.1f}% text-only, in {time.perf_counter() - started:.1f} s")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seq-len", type=int, default=4096, help="longest sample (titanmm's training.seq_len)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unique-images", type=int, default=500, help="distinct JPEGs the samples draw from")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: the CPUs, at most 16)")
    parser.add_argument("--force", action="store_true", help="rebuild even when OUT holds the same dataset")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.seq_len <= IMAGE_TOKENS:
        parser.error(f"--samples must be positive and --seq-len above {IMAGE_TOKENS}")
    stats = build_llava_sft_dataset(args.output, args.samples, args.seq_len, args.seed, args.unique_images,
                                    args.workers, force=args.force)
    print(json.dumps({"dataset": str(args.output), **stats["lengths"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
