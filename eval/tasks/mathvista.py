"""MathVista (testmini).

Input: `AI4Math/MathVista` saved with `datasets.save_to_disk` (a DatasetDict; --split, default "testmini",
picks the split) as --input-image-path. Columns used: pid, question, query, choices, answer, question_type,
answer_type, precision, decoded_image.

Prompt (Megatron's MathVistaDataset + `get_conversation`): system "You are math expert. Use your math
knowledge to calculate the answer."; user "<image>\\n" + for multi_choice the question, "A. choice" lines
and "Answer with the option's letter from the given choices directly.", for free_form MathVista's `query`
with "Hint: " removed.

Answer extraction is rule based (MathVista's own uses GPT-4): multi_choice responses are parsed into a
letter with MMMU's parser (first choice when nothing matches, as Megatron does); free_form responses go
through the VQA normalisation and, when they still hold words, "answer is <number>" is looked for
(Megatron's `extract_answer`), then "%" and a trailing "." are dropped. `eval.score` then applies
MathVista's `normalize_extracted_answer` (letter -> choice, int / float with the problem's precision).

Predictions: `[{"pid", "response", "extraction"}]`; ground truth `{pid: {"question_type", "answer_type",
"precision", "choices", "answer"}}` (MathVista's problem fields).
"""

from __future__ import annotations

import re

from eval.metrics import mmmu_parse_multi_choice, vqa_normalize
from eval.tasks.base import SYSTEM_MATH, Sample, Task, TaskInputs, choices_prompt, dataset_image, load_hf_dataset

_ANSWER_IS_NUMBER = re.compile(r"answer is -*\d+\.*\d*")
_NUMBER = re.compile(r"-*\d+\.*\d*")


def extract_free_form(response: str) -> str:
    """The short answer of a free-form response (see the module docstring)."""
    text = vqa_normalize(response.strip())
    if re.search(r"[a-zA-Z]", text) and "e+" not in text:
        found = _ANSWER_IS_NUMBER.findall(text)
        if found:
            numbers = _NUMBER.findall(found[0])
            text = numbers[0] if numbers else found[0]
    text = text.replace("%", "")
    return text[:-1] if text.endswith(".") else text


class MathVista(Task):
    name = "MathVista"
    system_prompt = SYSTEM_MATH
    max_new_tokens = 64
    id_key = "pid"

    def load(self, inputs: TaskInputs) -> list[Sample]:
        dataset = load_hf_dataset(inputs.input_image_path, inputs.split or "testmini")
        columns = ["pid", "question", "query", "choices", "answer", "question_type", "answer_type", "precision"]
        samples = []
        for row, item in enumerate(dataset.select_columns(columns)):
            problem = {k: item[k] for k in ("question_type", "answer_type", "precision", "choices", "answer")}
            if item["question_type"] == "multi_choice":
                prompt, letters, index2ans = choices_prompt(item["question"], list(item["choices"]))
                metadata = {"all_choices": letters, "index2ans": index2ans}
            else:
                prompt, metadata = item["query"].replace("Hint: ", ""), {}
            samples.append(Sample(item["pid"], prompt, [dataset_image(dataset, row, "decoded_image")], problem,
                                  {"question_type": item["question_type"], **metadata}))
        return samples

    def record(self, sample: Sample, text: str) -> dict:
        if sample.metadata["question_type"] == "multi_choice":
            extraction = mmmu_parse_multi_choice(text, sample.metadata["all_choices"], sample.metadata["index2ans"],
                                                 first_choice_fallback=True)
        else:
            extraction = extract_free_form(text)
        return {**super().record(sample, text), "extraction": extraction, **sample.metadata}

    def prediction(self, record: dict) -> dict:
        return {"pid": record["sample_id"], "response": record["answer"], "extraction": record["extraction"]}

    def groundtruth(self, samples: list[Sample]) -> dict:
        return {str(s.id): s.answer for s in samples}
