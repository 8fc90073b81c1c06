"""Benchmark tasks of `eval.run_text_generation`: how each reads its inputs, prompts, and writes its results.

One module per family: captioning (COCO Karpathy test, Flickr30k), vqa (TextVQA, VQAv2, ChartQA, SPDocVQA,
InfoVQA, AI2D), ocrbench, mathvista, mmmu, realworldqa. Each module's docstring gives the input format,
the prompt (Megatron-LM's examples/multimodal recipes) and the output records.
"""

from __future__ import annotations

from eval.tasks.base import Sample, Task, TaskInputs
from eval.tasks.captioning import Captioning
from eval.tasks.mathvista import MathVista
from eval.tasks.mmmu import MMMU
from eval.tasks.ocrbench import OCRBench
from eval.tasks.realworldqa import RealworldQA
from eval.tasks.vqa import AI2D, VQAv2, ChartQA, InfoVQA, SPDocVQA, TextVQA

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    Captioning, TextVQA, VQAv2, ChartQA, SPDocVQA, InfoVQA, AI2D, OCRBench, MathVista, MMMU, RealworldQA)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]()


__all__ = ["TASKS", "Sample", "Task", "TaskInputs", "get_task"]
