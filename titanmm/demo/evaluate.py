"""Held-out evaluation of the demo: greedy captions and answers for unseen scenes, scored like the benchmarks.

    result = evaluate(model, tokenizer, heldout, images_dir, chat_template="plain")
    result.cider, result.vqa_accuracy, result.vqa_by_type, result.captions, result.answers

Every held-out image is asked for its caption (`caption_prompt`, "describe the image." as in the
instruction data; "" for the caption-pretraining format, where the prompt is the image alone) and all
of its questions, each as a single-turn prompt built by `titanmm.generate.build_prompt` (the chat
template and the checkpoint's own image settings, as at training time). Prompts go through
`titanmm.generate.generate` in batches: greedy, KV cache, up to the template's end-of-turn token.

Scores: corpus CIDEr-D of the captions against the three reference captions of each image
(`eval.metrics.cider`: PTB tokenisation and pycocoevalcap's Cider, as the COCO caption tool), and
VQA accuracy (`eval.metrics.vqa_accuracy`, the official VQA v2 rule) with the answer as all ten
human answers, so an answer scores 1 when it is exactly right and 0 otherwise; also per question type.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tqdm import tqdm

from titanmm.demo.shapes import CAPTION_PROMPT
from titanmm.generate import GenerationConfig, build_prompt, eos_token_ids, generate

QUESTION_TYPES = (("how many shapes", "count"), ("how many", "color_count"), ("is there", "exists"),
                  ("what color", "color"), ("what shape", "shape"), ("where", "place"))
VQA_ANNOTATORS = 10


def question_type(question: str) -> str:
    """count, color_count, exists, color, shape or place (by the question's opening words)."""
    return next(kind for prefix, kind in QUESTION_TYPES if question.startswith(prefix))


@dataclass
class EvalResult:
    cider: float
    vqa_accuracy: float
    vqa_by_type: dict[str, float]
    captions: dict[str, str]
    """Generated caption per held-out image id."""
    answers: dict[str, list[str]]
    """Generated answers per held-out image id, in the order of its questions."""
    num_images: int
    num_questions: int
    seconds: float
    caption_lengths: dict[str, int] = field(default_factory=dict)
    """Generated caption length in tokens per image id (a model that never ends shows max_caption_tokens)."""

    def summary(self) -> dict:
        return {"cider": self.cider, "vqa_accuracy": self.vqa_accuracy, "vqa_by_type": self.vqa_by_type,
                "num_images": self.num_images, "num_questions": self.num_questions, "seconds": self.seconds}


def _batched_generate(model, tokenizer, requests: list[tuple[str, Path]], *, chat_template: str, batch_size: int,
                      config: GenerationConfig, progress: bool, desc: str) -> tuple[list[str], list[int]]:
    """Greedy replies (and their token counts) to (prompt text, image path) requests, in order."""
    texts, lengths = [], []
    images: dict[Path, Image.Image] = {}
    starts = range(0, len(requests), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        prompts, pixels = [], []
        for text, image_path in requests[start:start + batch_size]:
            if image_path not in images:
                with Image.open(image_path) as image:
                    images[image_path] = image.convert("RGB")
            ids, tiles = build_prompt("<image>\n" + text, tokenizer, chat_template=chat_template, model=model,
                                      images=[images[image_path]])
            prompts.append(ids)
            pixels.append(tiles)
        out = generate(model, prompts, pixel_values=torch.cat(pixels), tokenizer=tokenizer, config=config)
        texts += [t.strip() for t in out.texts]
        lengths += [len(ids) for ids in out.token_ids]
    return texts, lengths


@torch.no_grad()
def evaluate(model, tokenizer, heldout: Sequence[dict], images_dir: str | Path, *, chat_template: str = "plain",
             caption_prompt: str = CAPTION_PROMPT, batch_size: int = 64, max_caption_tokens: int = 64,
             max_answer_tokens: int = 8, questions: bool = True, progress: bool = True) -> EvalResult:
    """Caption and question every held-out record (see `shapes.write_dataset`'s heldout.json) and score them.

    `questions=False` only captions (a model that has not been taught to answer yet); its VQA scores are then
    NaN and `answers` empty.
    """
    from eval.metrics import cider, vqa_accuracy

    start = time.perf_counter()
    images_dir = Path(images_dir)
    was_training = model.training
    model.eval()
    eos = eos_token_ids(model, tokenizer, chat_template)
    try:
        caption_requests = [(caption_prompt, images_dir / r["image"]) for r in heldout]
        captions, lengths = _batched_generate(
            model, tokenizer, caption_requests, chat_template=chat_template, batch_size=batch_size,
            config=GenerationConfig(max_new_tokens=max_caption_tokens, eos_token_ids=eos), progress=progress,
            desc="Captioning held-out images")
        replies = []
        if questions:
            question_requests = [(q["question"], images_dir / r["image"]) for r in heldout for q in r["questions"]]
            replies, _ = _batched_generate(
                model, tokenizer, question_requests, chat_template=chat_template, batch_size=batch_size,
                config=GenerationConfig(max_new_tokens=max_answer_tokens, eos_token_ids=eos), progress=progress,
                desc="Answering held-out questions")
    finally:
        model.train(was_training)

    ids = [r["id"] for r in heldout]
    predictions = dict(zip(ids, captions))
    score = cider(predictions, {r["id"]: r["references"] for r in heldout})
    answers: dict[str, list[str]] = {}
    by_type: dict[str, list[float]] = {}
    replies_iter = iter(replies)
    for record in heldout if questions else ():
        answers[record["id"]] = []
        for q in record["questions"]:
            reply = next(replies_iter)
            answers[record["id"]].append(reply)
            by_type.setdefault(question_type(q["question"]), []).append(
                vqa_accuracy(reply, [q["answer"]] * VQA_ANNOTATORS))
    all_scores = [s for scores in by_type.values() for s in scores]
    return EvalResult(cider=score, vqa_accuracy=sum(all_scores) / len(all_scores) if all_scores else float("nan"),
                      vqa_by_type={k: sum(v) / len(v) for k, v in sorted(by_type.items())}, captions=predictions,
                      answers=answers, num_images=len(heldout), num_questions=len(all_scores),
                      seconds=time.perf_counter() - start, caption_lengths=dict(zip(ids, lengths)))
