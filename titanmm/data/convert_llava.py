"""Convert a LLaVA-style JSON dataset into WebDataset tar shards prepared for megatron-energon.

    python -m titanmm.data.convert_llava --json llava.json --images IMAGE_ROOT --output OUT \\
        [--shard-size 1000] [--val-fraction 0.0] [--seed 0] [--no-verify-images] [--workers 8]

Input: a JSON list of records

    {"id": "000123", "image": "coco/train2017/000123.jpg",      # optional, relative to --images
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}]}

`image` may also be a list of paths (multi-image conversations, one `<image>` placeholder per image in
reading order, as in LLaVA-NeXT-Interleave / LLaVA-OneVision data).

The same from a dataset saved with HF `datasets` (`save_to_disk`), e.g. a LLaVA instruction set kept locally:

    python -m titanmm.data.convert_llava --hf-dataset DIR [--hf-split train] --output OUT [--images ROOT]

with the columns `conversations` (as above), `image` (an `Image` feature, a list of them, or paths relative
to `--images`) and optionally `id`. Images are taken as their stored bytes (never re-encoded).

Output (`OUT`):

- `train-000000.tar`, ... and `val-000000.tar`, ... (`--val-fraction` of the records, picked with a
  seeded shuffle); each sample has the files `KEY.json` (`{"id", "conversations", "image_name"}`) and,
  when it has an image, `KEY.jpg` / `KEY.png` / `KEY.<format>` holding the original image bytes
  unchanged (decoding, EXIF rotation and alpha compositing happen at load time in titanmm's
  `load_image`, exactly as when the image is read from disk); a record with a list of images gets
  `KEY.0.<format>`, `KEY.1.<format>`, ... in list order (the sample's fields `0.jpg`, `1.png`, ...);
- `.nv-meta/` written by energon's own `energon prepare` command, run in-process and non-interactively:
  the tar index (`index.sqlite`, `.info.json`), `split.yaml` (train / val parts matched by shard name) and
  `dataset.yaml` with the sample type **`CrudeWebdataset`**: samples reach the task encoder as plain dicts
  and are "cooked" by `titanmm.data.energon.cook_llava` into `ConversationSample`s. (None of energon's
  typed samples fits a multi-turn conversation with any number of images: `VQASample` holds one image,
  one question and a list of answers.)

`KEY` is the record's `id` with characters that WebDataset treats specially ('.', '/', whitespace, ...)
replaced by '_' (a repeated key gets a `_dupN` suffix); the original id stays in the JSON.

A record with an image file that is missing, unreadable or (unless `--no-verify-images`) does not decode
with `titanmm.data.images.load_image` is dropped, counted and logged; so is a record without conversations.
The counts are printed at the end and written to `OUT/conversion_stats.json`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from titanmm.data.images import ImageDecodeError, load_image

logger = logging.getLogger(__name__)

TRAIN_PREFIX = "train"
VAL_PREFIX = "val"
# energon's split patterns are regular expressions matched against the shard file names, after brace expansion
# (which eats backslashes and braces, hence character classes instead of escapes).
SPLIT_PATTERNS = {TRAIN_PREFIX: "train-[0-9]+[.]tar$", VAL_PREFIX: "val-[0-9]+[.]tar$"}
IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-]")


def sample_key(record_id, index: int) -> str:
    """A WebDataset-safe key (no '.', '/', spaces) for a record; the index when there is no id."""
    text = str(record_id) if record_id is not None and str(record_id) else f"sample{index:09d}"
    return _KEY_BAD_CHARS.sub("_", text)


def _image_extension(data: bytes, name: str) -> str:
    """File extension for image bytes: from the decoded format, else from the file name."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
    except (UnidentifiedImageError, OSError, ValueError):
        fmt = None
    if fmt in IMAGE_EXTENSIONS:
        return IMAGE_EXTENSIONS[fmt]
    suffix = Path(name).suffix.lower().lstrip(".")
    return {"jpeg": "jpg"}.get(suffix, suffix) or "img"


def read_image(images_dir: Path, name: str, verify: bool) -> tuple[bytes | None, str | None, str | None]:
    """(bytes, extension, None) of an image file, or (None, None, reason) when it is missing / corrupt."""
    path = images_dir / name
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, None, "missing_image"
    except OSError as e:
        logger.warning("cannot read %s: %s", path, e)
        return None, None, "unreadable_image"
    if verify:
        try:
            load_image(data)
        except ImageDecodeError as e:
            logger.warning("corrupt image %s: %s", path, e)
            return None, None, "corrupt_image"
    return data, _image_extension(data, name), None


def read_image_bytes(data: bytes, name: str, verify: bool) -> tuple[bytes | None, str | None, str | None]:
    """Like `read_image` for image bytes already in memory (an HF `Image` feature's stored file)."""
    if verify:
        try:
            load_image(data)
        except ImageDecodeError as e:
            logger.warning("corrupt image %s: %s", name or "<bytes>", e)
            return None, None, "corrupt_image"
    return data, _image_extension(data, name), None


def _image_name(entry) -> str | None:
    """The file name of an image entry: a path, or an HF `Image` feature's {"bytes", "path"}."""
    return entry.get("path") if isinstance(entry, dict) else entry


def _is_image_entry(entry) -> bool:
    if isinstance(entry, dict):
        return bool(entry.get("bytes")) or bool(entry.get("path"))
    return isinstance(entry, str) and bool(entry)


def image_members(images_dir: Path, entries: list, indexed: bool, verify: bool) -> dict[str, bytes] | str:
    """The tar members of a record's images (paths relative to `images_dir`, or HF {"bytes", "path"} dicts):
    {ext: bytes} for one image, {"0.ext": ..., "1.ext": ...} for a list (`indexed`); or the reason
    (e.g. "missing_image") when one of them cannot be used."""
    files: dict[str, bytes] = {}
    for index, entry in enumerate(entries):
        if isinstance(entry, dict) and entry.get("bytes"):
            data, ext, reason = read_image_bytes(entry["bytes"], entry.get("path") or "", verify)
        else:
            data, ext, reason = read_image(images_dir, _image_name(entry), verify)
        if data is None:
            return reason
        files[f"{index}.{ext}" if indexed else ext] = data
    return files


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # deterministic shards
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes samples to `{prefix}-{n:06d}.tar` files of at most `shard_size` samples each."""

    def __init__(self, output: Path, prefix: str, shard_size: int):
        self.output, self.prefix, self.shard_size = output, prefix, shard_size
        self.shards: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        if self._tar is None or self._count >= self.shard_size:
            self.close()
            name = f"{self.prefix}-{len(self.shards):06d}.tar"
            self.shards.append(name)
            self._tar = tarfile.open(self.output / name, "w", format=tarfile.USTAR_FORMAT)
            self._count = 0
        for ext, data in files.items():
            _add_member(self._tar, f"{key}.{ext}", data)
        self._count += 1

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def _valid_conversations(conversations) -> bool:
    return (isinstance(conversations, list) and len(conversations) > 0
            and all(isinstance(t, dict) and isinstance(t.get("value"), str) and t.get("from") for t in conversations))


def write_shards(records: list, images_dir: Path, output: Path, shard_size: int = 1000, val_fraction: float = 0.0,
                 seed: int = 0, verify_images: bool = True, progress: bool = True) -> dict:
    """Write the records to train / val tar shards; returns stats (counts of written and dropped samples)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    output.mkdir(parents=True, exist_ok=True)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val_indices = set(order[:round(len(records) * val_fraction)])
    writers = {TRAIN_PREFIX: ShardWriter(output, TRAIN_PREFIX, shard_size),
               VAL_PREFIX: ShardWriter(output, VAL_PREFIX, shard_size)}
    stats: Counter = Counter()
    seen: Counter = Counter()
    try:
        for index, record in enumerate(tqdm(records, desc="Writing shards", unit="sample", disable=not progress)):
            if not isinstance(record, dict) or not _valid_conversations(record.get("conversations")):
                logger.warning("record %d (id %r) has no valid conversations; skipped", index,
                               record.get("id") if isinstance(record, dict) else None)
                stats["skipped_bad_record"] += 1
                continue
            key = sample_key(record.get("id"), index)
            seen[key] += 1
            if seen[key] > 1:
                key = f"{key}_dup{seen[key] - 1}"
            image_name = record.get("image")
            names = image_name if isinstance(image_name, list) else [image_name] if image_name else []
            if not all(_is_image_entry(name) for name in names):
                logger.warning("record %r: image must be a path or a list of paths, got %r; skipped",
                               record.get("id"), image_name)
                stats["skipped_bad_record"] += 1
                continue
            files = image_members(images_dir, names, indexed=isinstance(image_name, list), verify=verify_images)
            if isinstance(files, str):
                logger.warning("record %r: image %s: %s; skipped", record.get("id"), image_name, files)
                stats[f"skipped_{files}"] += 1
                continue
            named = [_image_name(n) for n in names]
            meta = {"id": record.get("id"), "image_name": (named if isinstance(image_name, list) else named[0])
                    if names else None,
                    "conversations": record["conversations"]}
            files["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
            split = VAL_PREFIX if index in val_indices else TRAIN_PREFIX
            writers[split].write(key, files)
            stats[f"written_{split}"] += 1
    finally:
        for writer in writers.values():
            writer.close()
    stats_dict = {k: stats[k] for k in sorted(stats)}
    stats_dict["train_shards"] = writers[TRAIN_PREFIX].shards
    stats_dict["val_shards"] = writers[VAL_PREFIX].shards
    return stats_dict


def hf_records(path: Path, split: str | None = None):
    """The rows of a dataset saved with HF `datasets`, images as their stored bytes ({"bytes", "path"})."""
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split is None:
            if len(dataset) != 1:
                raise ValueError(f"{path} holds the splits {list(dataset)}; choose one with --hf-split")
            split = next(iter(dataset))
        if split not in dataset:
            raise ValueError(f"{path} has no split {split!r}; it has {list(dataset)}")
        dataset = dataset[split]
    if "conversations" not in dataset.column_names:
        raise ValueError(f"{path}: no 'conversations' column (columns: {dataset.column_names})")
    feature = dataset.features.get("image")
    if isinstance(feature, datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    elif isinstance(feature, (datasets.Sequence, list)):
        inner = feature.feature if isinstance(feature, datasets.Sequence) else feature[0]
        if isinstance(inner, datasets.Image):
            dataset = dataset.cast_column("image", datasets.Sequence(datasets.Image(decode=False)))
    return dataset


def prepare_energon(output: Path, num_workers: int = 4, progress: bool = True) -> None:
    """Run energon's `energon prepare` non-interactively: tar index, split.yaml, dataset.yaml (CrudeWebdataset)."""
    from megatron.energon.tools.prepare import command

    args = [str(output), "--non-interactive", "--force-overwrite", "--sample-type", "CrudeWebdataset",
            "--num-workers", str(max(1, num_workers)), "--progress" if progress else "--no-progress"]
    for split, pattern in SPLIT_PATTERNS.items():
        args += ["--split-parts", f"{split}:{pattern}"]
    command.main(args, standalone_mode=False, prog_name="energon prepare")
    for name in ("dataset.yaml", "split.yaml"):
        if not (output / ".nv-meta" / name).is_file():
            raise RuntimeError(f"energon prepare did not write {output / '.nv-meta' / name}")


def convert(json_path: Path | None, images_dir: Path | None, output: Path, shard_size: int = 1000,
            val_fraction: float = 0.0, seed: int = 0, verify_images: bool = True, num_workers: int = 4,
            progress: bool = True, hf_dataset: Path | None = None, hf_split: str | None = None) -> dict:
    """LLaVA JSON (or a saved HF dataset) -> tar shards -> prepared energon dataset in `output`; returns the
    conversion stats."""
    if (json_path is None) == (hf_dataset is None):
        raise ValueError("give exactly one of a LLaVA JSON file and an HF dataset folder")
    if hf_dataset is not None:
        records, json_path = hf_records(Path(hf_dataset), hf_split), hf_dataset
    else:
        records = json.loads(Path(json_path).read_text())
        if not isinstance(records, list):
            raise ValueError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    images_dir = Path(images_dir) if images_dir is not None else Path(".")
    stats = write_shards(records, images_dir, Path(output), shard_size, val_fraction, seed, verify_images, progress)
    if not stats["train_shards"] and not stats["val_shards"]:
        raise RuntimeError(f"no sample of {json_path} could be converted: {stats}")
    prepare_energon(Path(output), num_workers, progress)
    (Path(output) / "conversion_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    skipped = {k: v for k, v in stats.items() if k.startswith("skipped_")}
    logger.info("converted %s: %s", json_path, {k: v for k, v in stats.items() if k.startswith("written_")})
    if skipped:
        logger.warning("skipped records: %s", skipped)
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m titanmm.data.convert_llava", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--json", type=Path, help="LLaVA JSON file (a list of records)")
    source.add_argument("--hf-dataset", type=Path, help="a dataset saved with HF datasets' save_to_disk")
    parser.add_argument("--hf-split", default=None, help="split of --hf-dataset (when it holds several)")
    parser.add_argument("--images", type=Path, default=None,
                        help="folder the records' image paths are relative to (needed for paths, not for HF images)")
    parser.add_argument("--output", required=True, type=Path, help="output folder (shards + .nv-meta)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="fraction of records for the val split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train / val assignment")
    parser.add_argument("--no-verify-images", action="store_true",
                        help="keep images without decoding them (corrupt ones are then skipped at load time)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="energon indexing workers")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.json is not None and args.images is None:
        parser.error("--json needs --images (the folder its image paths are relative to)")
    stats = convert(args.json, args.images, args.output, args.shard_size, args.val_fraction, args.seed,
                    not args.no_verify_images, args.workers, not args.no_progress, args.hf_dataset, args.hf_split)
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
