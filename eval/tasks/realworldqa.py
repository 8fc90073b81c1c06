"""RealWorldQA.

Prompt: system "Follow the user's instruction and answer questions."; user "<image>\\n{question}".

Inputs, either:

* `xai-org/RealworldQA` saved with `datasets.save_to_disk` as --input-image-path (columns image, question,
  answer; --split default "test"): the question already ends with the answer instruction and is used as
  is; the id is the row index;
* Megatron's JSON list (--gt-path, images in --input-image-path): `{"image": "0.webp", "question": ...,
  "question_type": "multi-choice" | ..., "choices": [...], "correct_choice_index": 1, "answer": ...}`;
  multi-choice questions get "A. choice" lines and "Answer with the option's letter from the given
  choices directly.", the others "Answer the question using a single word or phrase."; the id is the
  image name's number.

Predictions: `[{"question_id", "answer"}]`; ground truth `[{"question_id", "answer"}]` (exact match,
case-insensitive).
"""

from __future__ import annotations

from pathlib import Path

from eval.tasks.base import (
    SHORT_ANSWER,
    SYSTEM_FOLLOW,
    Sample,
    Task,
    TaskInputs,
    choices_prompt,
    dataset_image,
    image_file,
    is_saved_dataset,
    load_hf_dataset,
    read_json_or_jsonl,
    records_of,
)


class RealworldQA(Task):
    name = "RealworldQA"
    system_prompt = SYSTEM_FOLLOW
    max_new_tokens = 16

    def load(self, inputs: TaskInputs) -> list[Sample]:
        if inputs.input_image_path and is_saved_dataset(inputs.input_image_path):
            dataset = load_hf_dataset(inputs.input_image_path, inputs.split or "test")
            return [Sample(row, item["question"], [dataset_image(dataset, row, "image")], item["answer"])
                    for row, item in enumerate(dataset.select_columns(["question", "answer"]))]
        samples = []
        for row in records_of(read_json_or_jsonl(inputs.gt_path), "data"):
            stem = Path(row["image"]).stem
            sample_id = int(stem) if stem.isdigit() else stem
            if row.get("question_type") == "multi-choice":
                prompt, letters, _ = choices_prompt(row["question"], list(row["choices"]))
                answer = letters[row["correct_choice_index"]]
            else:
                prompt, answer = f"{row['question']}\n{SHORT_ANSWER}", row["answer"]
            samples.append(Sample(sample_id, prompt, [image_file(inputs.input_image_path, row["image"], ())], answer))
        return samples

    def groundtruth(self, samples: list[Sample]):
        return [{"question_id": s.id, "answer": s.answer} for s in samples]
