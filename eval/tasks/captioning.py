"""Image captioning: COCO (Karpathy test split) and Flickr30k.

Prompt (Megatron `get_conversation("captioning")`): system "Answer the questions.", user
"<image>\\nGive a brief description of this image in one sentence."

--gt-path takes either of the two usual annotation formats:

* Karpathy split JSON (`dataset_coco.json`, `dataset_flickr30k.json`):
  `{"images": [{"filename": "COCO_val2014_000000391895.jpg", "filepath": "val2014", "split": "test",
  "cocoid": 391895, "sentences": [{"raw": "A man ..."}, ...]}, ...]}`. The images of `--split`
  (default "test") are evaluated; the image id is `cocoid`, else (Flickr30k) the file name's number.
  Images are looked up as `DIR/filepath/filename`, then `DIR/filename`.
* COCO captions JSON (`captions_val2014.json`, `coco_karpathy_test_gt.json`):
  `{"images": [{"id": 391895, "file_name": "..."}], "annotations": [{"image_id": 391895, "caption": "..."}]}`.
  Every image of "images" is evaluated, found as `DIR/file_name`. Without an "images" list, every file of
  DIR whose id (the number after the last "_" of the name, else the whole stem: Megatron's rule) has
  annotations is evaluated.

Predictions: `[{"image_id": id, "caption": text}]` (the COCO results format); ground truth:
`{"annotations": [{"image_id": id, "caption": reference}, ...]}`.
"""

from __future__ import annotations

import os
from pathlib import Path

from eval.tasks.base import SYSTEM_ANSWER, Sample, Task, TaskInputs, image_file, read_json_or_jsonl

CAPTION_PROMPT = "Give a brief description of this image in one sentence."


def image_id_from_file_name(name: str):
    """COCO "COCO_val2014_000000391895.jpg" -> 391895; Flickr30k "1000092795.jpg" -> 1000092795."""
    stem = Path(name).stem
    tail = stem.rsplit("_", 1)[-1]
    for candidate in (tail, stem):
        if candidate.isdigit():
            return int(candidate)
    return stem


def load_caption_set(gt_path: str, image_folder: str, split: str = "test") -> list[Sample]:
    """Captioning samples (id, image, reference captions) of a Karpathy-split or COCO-captions JSON file."""
    data = read_json_or_jsonl(gt_path)
    if not isinstance(data, dict) or not isinstance(data.get("images", data.get("annotations")), list):
        raise ValueError(f"{gt_path}: expected a Karpathy split JSON ({{\"images\": [...]}} with \"sentences\") or a "
                         "COCO captions JSON ({\"annotations\": [...]})")
    if "annotations" not in data:
        return _karpathy(data["images"], image_folder, split or "test", gt_path)
    references: dict = {}
    for ann in data["annotations"]:
        references.setdefault(ann["image_id"], []).append(ann["caption"])
    if isinstance(data.get("images"), list):
        files = [(image["id"], image["file_name"]) for image in data["images"]]
    else:
        names = sorted(os.listdir(image_folder))
        files = [(image_id_from_file_name(name), name) for name in names]
        files = [(image_id, name) for image_id, name in files if image_id in references]
    samples = []
    for image_id, name in files:
        if image_id not in references:
            raise ValueError(f"{gt_path}: image {image_id} has no captions")
        samples.append(Sample(image_id, CAPTION_PROMPT, [image_file(image_folder, name, ())], references[image_id]))
    return samples


def _karpathy(images: list[dict], image_folder: str, split: str, gt_path: str) -> list[Sample]:
    samples = []
    for image in images:
        if image.get("split") != split:
            continue
        name = image["filename"]
        image_id = image["cocoid"] if "cocoid" in image else image_id_from_file_name(name)
        relative = os.path.join(image.get("filepath", ""), name)  # find_image falls back to DIR/filename
        captions = [s["raw"] for s in image["sentences"]]
        samples.append(Sample(image_id, CAPTION_PROMPT, [image_file(image_folder, relative, ())], captions))
    if not samples:
        raise ValueError(f"{gt_path}: no image of split {split!r}")
    return samples


class Captioning(Task):
    name = "captioning"
    system_prompt = SYSTEM_ANSWER
    max_new_tokens = 32
    output_key = "caption"
    id_key = "image_id"

    def load(self, inputs: TaskInputs) -> list[Sample]:
        return load_caption_set(inputs.gt_path, inputs.input_image_path, inputs.split or "test")

    def record(self, sample: Sample, text: str) -> dict:
        return {**super().record(sample, text), "ground_truth": sample.answer}

    def prediction(self, record: dict) -> dict:
        return {"image_id": record["sample_id"], "caption": record["caption"]}

    def groundtruth(self, samples: list[Sample]) -> dict:
        return {"annotations": [{"image_id": s.id, "caption": c} for s in samples for c in s.answer]}
