"""MMMU (validation).

Input (--input-image-path): `MMMU/MMMU` saved with `datasets.save_to_disk`, either one saved dataset (all
subjects concatenated; a DatasetDict is indexed by --split, default "validation") or a folder holding one
saved dataset per subject (`DIR/Accounting`, `DIR/Art`, ...; Megatron's local layout). Columns used: id,
question, options (a Python-list string), answer, question_type, image_1 (and the option texts' image tags).

Prompt (Megatron's MMMUDataset, prompt_style "single_image", with MMMU's LLaVA-1.5 config): system
"Answer the questions."; user "<image>\\n" + for multiple-choice "{question}\\n(A) option\\n(B) option\\n\\nAnswer
with the option's letter from the given choices directly.", for open questions "{question}\\nAnswer the
question using a single word or phrase."; the `<image 1>` reference in the text is then rewritten by
Megatron's heuristics (`rewrite_image_tags`) and `<image 2>` .. `<image 7>` are removed. Only image_1 is
shown (MMMU's single-image protocol; where MMMU would show no image because several options are images,
image_1 is shown too).

Multiple-choice responses are parsed into a letter as Megatron does: a `\\answer{..}` / `\\boxed{..}` content
is taken first, then MMMU's parser with the first choice as fallback. Predictions: `{id: letter or raw
response}` (MMMU's `main_eval_only` format, also readable with the official `answer_dict_val.json`);
ground truth: `{id: {"question_type", "ground_truth"}}`.
"""

from __future__ import annotations

import ast
import os
import re

from eval.metrics import mmmu_multi_choice_info, mmmu_parse_multi_choice
from eval.tasks.base import (
    SHORT_ANSWER,
    SYSTEM_ANSWER,
    Sample,
    Task,
    TaskInputs,
    dataset_image,
    is_saved_dataset,
    load_hf_dataset,
)

MULTIPLE_CHOICE = "multiple-choice"
_IMG = "<image 1>"

# Megatron's `process_image_tag`: the first rule whose test matches rewrites the prompt.
_TAG_RULES = (
    (lambda q: q == _IMG, lambda q: "Answer the question in the image."),
    (lambda q: ":" + _IMG in q, lambda q: q.replace(":" + _IMG, " in the image. ").strip()),
    (lambda q: ": " + _IMG in q, lambda q: q.replace(": " + _IMG, " in the image. ").strip()),
    (lambda q: "." + _IMG in q or ". " + _IMG in q,
     lambda q: " ".join(part.strip() for part in q.split(_IMG) if part.strip())),
    (lambda q: q.startswith(_IMG + " "),
     lambda q: (q.replace(_IMG, "") if q[len(_IMG) + 1].isupper() else q.replace(_IMG, "The image")).strip()),
    (lambda q: q.startswith(_IMG), lambda q: q.replace(_IMG, "")),
    (lambda q: q.endswith(_IMG + "?"), lambda q: q.replace(_IMG, "the image")),
    (lambda q: q.endswith(("?" + _IMG, "? " + _IMG, "\n" + _IMG)), lambda q: q.replace(_IMG, "").strip()),
    (lambda q: " " + _IMG + " " in q, lambda q: q.replace(_IMG, "the image")),
    (lambda q: " " + _IMG in q, lambda q: q.replace(_IMG, "the image")),
    (lambda q: "()" + _IMG in q, lambda q: q.replace("()" + _IMG, "")),
    (lambda q: "(" + _IMG + ")" in q, lambda q: q.replace("(" + _IMG + ")", "")),
    (lambda q: _IMG + "." in q, lambda q: q.replace(_IMG + ".", ". ")),
)


def rewrite_image_tags(prompt: str) -> str:
    """Replace MMMU's `<image 1>` reference by words (the image itself goes in front of the prompt)."""
    prompt = prompt.strip()
    for test, rewrite in _TAG_RULES:
        if test(prompt):
            prompt = rewrite(prompt)
            break
    else:
        prompt = prompt.replace(_IMG, ". ").strip()
    for index in range(2, 8):
        prompt = prompt.replace(f"<image {index}>", "")
    return prompt


def mmmu_prompt(question: str, options: list[str], question_type: str) -> str:
    """MMMU's `construct_prompt` with the LLaVA-1.5 config (before the image-tag rewrite)."""
    question = question.strip()
    if question_type == MULTIPLE_CHOICE:
        listed = "".join(f"({chr(ord('A') + i)}) {option}\n" for i, option in enumerate(options))
        return f"{question}\n{listed}\nAnswer with the option's letter from the given choices directly."
    return f"{question}\n{SHORT_ANSWER}"


def extract_boxed(response: str) -> str:
    """Megatron's `extract_answer`: the content of `\\answer{..}` or `\\boxed{..}`, else the response."""
    for pattern in (r"\\answer\{(.*?)\}", r"\\boxed\{(.*?)\}"):
        match = re.search(pattern, response)
        if match:
            return match.group(1)
    return response.replace("Answer:", "Answer: ")


def _load_mmmu(path: str, split: str):
    if is_saved_dataset(path):
        return load_hf_dataset(path, split)
    import datasets

    subjects = sorted(d for d in os.listdir(path) if is_saved_dataset(os.path.join(path, d)))
    if not subjects:
        raise ValueError(f"{path} is neither a saved dataset nor a folder of per-subject saved datasets")
    return datasets.concatenate_datasets([load_hf_dataset(os.path.join(path, s), split) for s in subjects])


class MMMU(Task):
    name = "MMMU"
    system_prompt = SYSTEM_ANSWER
    max_new_tokens = 64
    output_key = "text"
    id_key = "id"

    def load(self, inputs: TaskInputs) -> list[Sample]:
        dataset = _load_mmmu(inputs.input_image_path, inputs.split or "validation")
        samples = []
        for row, item in enumerate(dataset.select_columns(["id", "question", "options", "answer", "question_type"])):
            options = ast.literal_eval(item["options"]) if isinstance(item["options"], str) else list(item["options"])
            prompt = rewrite_image_tags(mmmu_prompt(item["question"], options, item["question_type"]))
            metadata = {"question_type": item["question_type"]}
            if item["question_type"] == MULTIPLE_CHOICE:
                index2ans, letters = mmmu_multi_choice_info(options)
                metadata.update(index2ans=index2ans, all_choices=letters)
            samples.append(Sample(item["id"], prompt, [dataset_image(dataset, row, "image_1")], item["answer"],
                                  metadata))
        return samples

    def record(self, sample: Sample, text: str) -> dict:
        prediction = text
        if sample.metadata["question_type"] == MULTIPLE_CHOICE:
            prediction = mmmu_parse_multi_choice(extract_boxed(text), sample.metadata["all_choices"],
                                                 sample.metadata["index2ans"], first_choice_fallback=True)
        return {**super().record(sample, text), "prediction": prediction, **sample.metadata}

    def predictions(self, records: list[dict]) -> dict:
        return {str(r["sample_id"]): r["prediction"] for r in records}

    def groundtruth(self, samples: list[Sample]) -> dict:
        return {str(s.id): {"question_type": s.metadata["question_type"], "ground_truth": s.answer} for s in samples}
