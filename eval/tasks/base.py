"""What every benchmark task provides to `eval.run_text_generation`, and helpers to read its inputs.

A task turns its input files into `Sample`s (id, user prompt text, images, ground truth), builds the
record that is appended to the per-rank JSONL file once a sample is generated, and writes the two files
`python -m eval.score` reads: the merged predictions and the ground truth (for the evaluated samples
only, in a format `eval.score` accepts, whatever format the benchmark ships in).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# System prompts of Megatron-LM's examples/multimodal/run_text_generation.py `get_conversation`.
SYSTEM_ANSWER = "Answer the questions."
SYSTEM_FOLLOW = "Follow the user's instruction and answer questions."
SYSTEM_MATH = "You are math expert. Use your math knowledge to calculate the answer."

# Instructions appended to questions (LLaVA-1.5 / Megatron / VLMEvalKit wording).
SHORT_ANSWER = "Answer the question using a single word or phrase."
SHORT_ANSWER_OR_NUMBER = "Answer the question using a single word, phrase, or number."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."

ImageSource = str | Path | Callable[[], Any]
"""An image file path, or a zero-argument callable returning a PIL image (rows of an HF dataset)."""


@dataclass
class Sample:
    """One benchmark question (or captioning image)."""

    id: Any
    """The benchmark's id (question_id, questionId, pid, image_id, ...); written to the predictions."""
    question: str
    """The user prompt text. Images go in front of it unless it holds `<image>` placeholders."""
    images: list[ImageSource] = field(default_factory=list)
    answer: Any = None
    """Ground truth, in the form the task's `groundtruth` writes it."""
    metadata: dict = field(default_factory=dict)
    """Task-specific fields needed to parse the output or to score (choices, question type, ...)."""


@dataclass
class TaskInputs:
    """Where a task reads its data (the runner's --input-image-path, --gt-path, --question-path, --split)."""

    input_image_path: str = ""
    gt_path: str = ""
    question_path: str = ""
    split: str = ""


class Task:
    """Base class; one subclass per benchmark (see eval/tasks/__init__.py for the registry)."""

    name: str = ""
    system_prompt: str = SYSTEM_FOLLOW
    """Default system prompt (used with a chat template)."""
    max_new_tokens: int = 16
    """Default generation length (--max-new-tokens overrides)."""
    output_key: str = "answer"
    """Key of the generated text in the per-rank records (Megatron's: "caption", "answer", "text")."""
    id_key: str = "question_id"
    """Id key of the merged prediction and ground-truth records."""

    def load(self, inputs: TaskInputs) -> list[Sample]:
        raise NotImplementedError

    def record(self, sample: Sample, text: str) -> dict:
        """The JSON record of one generated sample (appended to the rank's partial file)."""
        return {"sample_id": sample.id, "prompt": sample.question, self.output_key: text}

    def prediction(self, record: dict) -> dict:
        """One entry of the merged predictions file."""
        return {self.id_key: record["sample_id"], "answer": record[self.output_key]}

    def predictions(self, records: list[dict]) -> Any:
        """The merged predictions file (records in sample order)."""
        return [self.prediction(r) for r in records]

    def groundtruth(self, samples: list[Sample]) -> Any:
        """The ground-truth file for `samples` (None when the inputs have no answers, e.g. a test split)."""
        if any(s.answer is None for s in samples):
            return None
        return [{self.id_key: s.id, "answers": s.answer if isinstance(s.answer, list) else [s.answer]}
                for s in samples]


# ------------------------------------------------------------------------------------------------
# Input helpers
# ------------------------------------------------------------------------------------------------

def read_json_or_jsonl(path: str) -> Any:
    """A JSON document, or the list of records of a JSONL file."""
    if not path:
        raise ValueError("this task needs --gt-path (its annotation file)")
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


def records_of(data: Any, *keys: str) -> list[dict]:
    """The record list of a loaded annotation file: the list itself or the list under one of `keys`."""
    if isinstance(data, dict):
        for key in keys:
            if isinstance(data.get(key), list):
                return data[key]
        raise ValueError(f"expected a list of records or an object with one of {list(keys)}; got keys "
                         f"{sorted(data)[:10]}")
    if not isinstance(data, list):
        raise ValueError(f"expected a list of records, got {type(data).__name__}")
    return data


def find_image(folder: str, name: str, extensions: tuple[str, ...] = (".jpg", ".png")) -> str:
    """`folder/name`, else the same with one of `extensions` added, else `folder/basename(name)`.

    (Megatron's VQA datasets try the name, then `.jpg`, then `.png`; annotation files that carry a
    sub-folder, e.g. DocVQA's "documents/x.png", also work with a folder holding the files directly.)
    """
    candidates = [os.path.join(folder, name)] + [os.path.join(folder, name + ext) for ext in extensions]
    base = os.path.basename(name)
    if base != name:
        candidates += [os.path.join(folder, base)] + [os.path.join(folder, base + ext) for ext in extensions]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"image {name!r} not found in {folder!r} (tried {', '.join(candidates)})")


class LazyImage:
    """An image resolved only when the sample is generated (a file looked up in a folder, or a dataset cell)."""

    def __init__(self, resolve: Callable[[], Any], name: str):
        self.resolve = resolve
        self.name = name

    def __call__(self):
        return self.resolve()

    def __repr__(self) -> str:
        return f"LazyImage({self.name})"


def image_file(folder: str, name: str, extensions: tuple[str, ...] = (".jpg", ".png")) -> LazyImage:
    return LazyImage(lambda: find_image(folder, name, extensions), name)


def dataset_image(dataset, row: int, column: str) -> LazyImage:
    """The image in `dataset[row][column]` (an HF `datasets` Image feature decodes to PIL)."""
    return LazyImage(lambda: dataset[row][column], f"{column}[{row}]")


def load_hf_dataset(path: str, split: str):
    """A dataset saved with `datasets.save_to_disk` (a Dataset, or a DatasetDict from which `split` is taken).

    `datasets` is imported here only: the runner works without it for the tasks that ship as JSON.
    """
    if not path:
        raise ValueError("this task reads a dataset saved with datasets.save_to_disk: pass its folder as "
                         "--input-image-path")
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {path} needs the `datasets` package (pip install datasets)") from None
    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} holds the splits {sorted(loaded)}; choose one with --split (got {split!r})")
        return loaded[split]
    return loaded


def is_saved_dataset(path: str) -> bool:
    """True for a folder written by `datasets.save_to_disk` (a Dataset or a DatasetDict)."""
    return os.path.isfile(os.path.join(path, "dataset_info.json")) or \
        os.path.isfile(os.path.join(path, "dataset_dict.json"))


def choices_prompt(question: str, choices: list[str]) -> tuple[str, list[str], dict[str, str]]:
    """Megatron's multiple-choice prompt: the question, "A. choice" lines, then the letter instruction.

    Returns (prompt, letters, letter -> choice).
    """
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    lines = "".join(f"{letter}. {choice}\n" for letter, choice in zip(letters, choices))
    return f"{question}\n{lines}{LETTER_ANSWER}", letters, dict(zip(letters, choices))
