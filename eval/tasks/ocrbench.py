"""OCRBench (v1).

Prompt (Megatron): system "Follow the user's instruction and answer questions.", user "<image>\\n{question}".

Input: `OCRBench.json` (--gt-path), a list of `{"dataset_name": "IIIT5K", "id": 0, "image_path": "IIIT5K/x.jpg",
"question": "what is written in the image?", "answers": ["..."] or "...", "type": "Regular Text Recognition"}`;
images under --input-image-path. The id is "id", else the position in the file.

Predictions: `[{"question_id": id, "answer": text}]`; ground truth: `[{"question_id", "answers",
"dataset_name", "type"}]` (`eval.score` matches by substring, per OCRBench's rules, and counts per type).
"""

from __future__ import annotations

from eval.tasks.base import SYSTEM_FOLLOW, Sample, Task, TaskInputs, image_file, read_json_or_jsonl, records_of


class OCRBench(Task):
    name = "OCRBench"
    system_prompt = SYSTEM_FOLLOW
    max_new_tokens = 64

    def load(self, inputs: TaskInputs) -> list[Sample]:
        samples = []
        for index, row in enumerate(records_of(read_json_or_jsonl(inputs.gt_path), "data")):
            answers = row["answers"] if isinstance(row["answers"], list) else [row["answers"]]
            samples.append(Sample(row.get("id", index), row["question"],
                                  [image_file(inputs.input_image_path, row["image_path"], ())], answers,
                                  {"dataset_name": row["dataset_name"], "type": row["type"]}))
        return samples

    def record(self, sample: Sample, text: str) -> dict:
        return {**super().record(sample, text), **sample.metadata}

    def groundtruth(self, samples: list[Sample]):
        return [{"question_id": s.id, "answers": s.answer, **s.metadata} for s in samples]
