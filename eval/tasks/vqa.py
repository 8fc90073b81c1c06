"""Short-answer VQA benchmarks read from their annotation JSON: TextVQA, VQAv2, ChartQA, SPDocVQA, InfoVQA, AI2D.

Prompts (Megatron `get_conversation`; system "Follow the user's instruction and answer questions."):

| task | user turn after `<image>\\n` |
|---|---|
| TextVQA, SPDocVQA, InfoVQA | "{question}\\nAnswer the question using a single word, phrase, or number." |
| VQAv2, ChartQA | "{question}\\nAnswer the question using a single word or phrase." |
| AI2D | "{question}" (the question of the JSONL already lists the options and the instruction) |

Inputs (--gt-path, images in --input-image-path):

| task | annotation file | id | image | question | answers |
|---|---|---|---|---|---|
| TextVQA | `TextVQA_0.5.1_val.json` `{"data": [...]}` | question_id | `image_id` (+ .jpg / .png) | question | answers |
| VQAv2 | `v2_OpenEnded_mscoco_val2014_questions.json` (--question-path) + `v2_mscoco_val2014_annotations.json` (--gt-path, optional: test-dev has none) | question_id | `COCO_{data_subtype}_{image_id:012d}.jpg` | question | answers[].answer |
| VQAv2 (one file) | Megatron's converted list, --gt-path only | question_id | image | question | answer (list) |
| ChartQA | `test/test_human.json` / `test_augmented.json` (a list) | position in the file | imgname | query | label |
| SPDocVQA | `val_v1.0_withQT.json` `{"data": [...]}` | questionId | image ("documents/x.png") | question | answers |
| InfoVQA | `infographicsVQA_val_v1.0_withQT.json` `{"data": [...]}` | questionId | image_local_name | question | answers |
| AI2D | Megatron's / VLMEvalKit's `test_vlmevalkit.jsonl` | question_id | image (its base name) | question | answer (letter) |
| AI2D (HF) | `lmms-lab/ai2d` saved with `save_to_disk`, as --input-image-path | row index | image | question + options | answer (option index) |

Predictions: `[{"question_id": id, "answer": text}]` (the EvalAI submission format for VQAv2 / TextVQA).
"""

from __future__ import annotations

from eval.tasks.base import (
    SHORT_ANSWER,
    SHORT_ANSWER_OR_NUMBER,
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


class KeyedVQA(Task):
    """A VQA annotation file whose records hold an id, an image name, a question and answers under fixed keys."""

    keys: dict[str, str | None] = {}
    """"id" (None: the position in the file), "image", "question", "answers"."""
    instruction: str | None = None
    """Appended to the question on a new line."""

    def prompt(self, question: str) -> str:
        return f"{question}\n{self.instruction}" if self.instruction else question

    def load(self, inputs: TaskInputs) -> list[Sample]:
        rows = records_of(read_json_or_jsonl(inputs.gt_path), "data", "questions", "annotations")
        return [self.sample(index, row, inputs.input_image_path) for index, row in enumerate(rows)]

    def sample(self, index: int, row: dict, image_folder: str) -> Sample:
        k = self.keys
        sample_id = index if k["id"] is None else row[k["id"]]
        answer = row.get(k["answers"])
        if isinstance(answer, list):
            answer = [a["answer"] if isinstance(a, dict) else a for a in answer]
        return Sample(sample_id, self.prompt(row[k["question"]]), [image_file(image_folder, str(row[k["image"]]))],
                      answer)


class TextVQA(KeyedVQA):
    name = "TextVQA"
    keys = {"id": "question_id", "image": "image_id", "question": "question", "answers": "answers"}
    instruction = SHORT_ANSWER_OR_NUMBER


class SPDocVQA(KeyedVQA):
    name = "SPDocVQA"
    keys = {"id": "questionId", "image": "image", "question": "question", "answers": "answers"}
    instruction = SHORT_ANSWER_OR_NUMBER


class InfoVQA(KeyedVQA):
    name = "InfoVQA"
    keys = {"id": "questionId", "image": "image_local_name", "question": "question", "answers": "answers"}
    instruction = SHORT_ANSWER_OR_NUMBER


class ChartQA(KeyedVQA):
    name = "ChartQA"
    keys = {"id": None, "image": "imgname", "question": "query", "answers": "label"}
    instruction = SHORT_ANSWER

    def groundtruth(self, samples: list[Sample]):
        return [{"question_id": s.id, "answer": s.answer} for s in samples]


class VQAv2(KeyedVQA):
    name = "VQAv2"
    keys = {"id": "question_id", "image": "image", "question": "question", "answers": "answer"}
    instruction = SHORT_ANSWER

    def load(self, inputs: TaskInputs) -> list[Sample]:
        if not inputs.question_path:
            return super().load(inputs)  # Megatron's one-file format
        questions = read_json_or_jsonl(inputs.question_path)
        subtype = questions.get("data_subtype", "val2014") if isinstance(questions, dict) else "val2014"
        answers = {}
        if inputs.gt_path:
            for ann in records_of(read_json_or_jsonl(inputs.gt_path), "annotations"):
                answers[ann["question_id"]] = [a["answer"] for a in ann["answers"]]
        samples = []
        for q in records_of(questions, "questions"):
            image = f"{subtype}/COCO_{subtype}_{int(q['image_id']):012d}.jpg"  # find_image also tries DIR/COCO_...
            samples.append(Sample(q["question_id"], self.prompt(q["question"]),
                                  [image_file(inputs.input_image_path, image, ())], answers.get(q["question_id"])))
        if inputs.gt_path:
            missing = [s.id for s in samples if s.answer is None]
            if missing:
                raise ValueError(f"{inputs.gt_path}: no annotation for {len(missing)} question(s), e.g. {missing[:5]}")
        return samples

    def groundtruth(self, samples: list[Sample]):
        if any(s.answer is None for s in samples):
            return None
        return {"annotations": [{"question_id": s.id, "answers": [{"answer": a} for a in s.answer]}
                                for s in samples]}


class AI2D(KeyedVQA):
    name = "AI2D"
    keys = {"id": "question_id", "image": "image", "question": "question", "answers": "answer"}

    def load(self, inputs: TaskInputs) -> list[Sample]:
        if inputs.input_image_path and is_saved_dataset(inputs.input_image_path):
            return self._from_hf(inputs)
        return super().load(inputs)

    def _from_hf(self, inputs: TaskInputs) -> list[Sample]:
        dataset = load_hf_dataset(inputs.input_image_path, inputs.split or "test")
        samples = []
        for row, item in enumerate(dataset.select_columns(["question", "options", "answer"])):
            prompt, letters, _ = choices_prompt(item["question"], list(item["options"]))
            answer = item["answer"]
            answer = letters[int(answer)] if str(answer).strip().isdigit() else str(answer)
            samples.append(Sample(row, prompt, [dataset_image(dataset, row, "image")], answer))
        return samples

    def groundtruth(self, samples: list[Sample]):
        return [{"question_id": s.id, "answer": s.answer} for s in samples]
