"""Captioning evaluation during training: every `[eval] interval` steps, CIDEr of the model's captions.

The `[eval]` section names a small captioning set (`eval.tasks.captioning` formats: a Karpathy split JSON,
whose "test" images are used, or a COCO captions JSON) and its image folder. At an evaluation step:

1. the first `num_samples` images are dealt round-robin to the data-parallel ranks; a rank with fewer
   images repeats its last one, so that every rank captions the same number of images in the same batches;
2. each rank captions its share with `titanmm.generate` (greedy), prompted the way the model trains: the
   training chat template (`multimodal.chat_template`, or the flavor's default) around the image and, unless
   the training task is captioning (whose user turn is the image alone), Megatron's captioning instruction
   "Give a brief description of this image in one sentence.". Under FSDP
   every forward pass is collective (each block all-gathers its parameters), so all ranks decode exactly
   `max_new_tokens` steps (`GenerationConfig.fixed_steps`), and the root FSDP unit (embeddings, projector,
   patch embedding, final norm, output layer), which generation uses outside the model's forward, is
   gathered once up front with `unshard()`;
3. rank 0 gathers the captions, computes CIDEr-D (`eval.metrics.cider`, pycocoevalcap), writes the captions
   to `{dump_folder}/eval/step-{N}.jsonl` and shares the score; the training loop logs it as `eval_cider`.

Generation runs in inference mode (FSDP2 only writes into the unsharded parameter buffers its training
steps made), with torch.compile'd blocks run eagerly (decoding shapes change every step) and the model in
eval mode; afterwards every FSDP unit is resharded and the model is back in train mode. Tensor, context
and pipeline parallel layouts are not supported (the config loader refuses them with `eval.enable`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger("titanmm")


class OnlineEval:
    """`maybe_run(step)` -> ({"eval_cider": value}, seconds spent) at evaluation steps, ({}, 0.0) otherwise."""

    def __init__(self, config, model, dims, device: torch.device, dump_folder: str | Path):
        self.config = config.eval
        self.enabled = self.config.enable
        if not self.enabled:
            return
        from eval.tasks.captioning import CAPTION_PROMPT, load_caption_set
        from titanmm.data.tokenizer import build_tokenizer
        from titanmm.data.vlm_data import default_chat_template

        dataset = Path(self.config.dataset)
        image_folder = self.config.image_folder or str(dataset.parent)
        self.samples = load_caption_set(str(dataset), image_folder)[:self.config.num_samples]
        self.prompt = "" if config.multimodal.task == "captioning" else CAPTION_PROMPT
        self.chat_template = config.multimodal.chat_template or default_chat_template(model.args)
        self.model = model
        self.device = device
        from titanmm.parallel.parallelize import mixed_precision_context

        self.mixed_precision = mixed_precision_context(dims, config, device.type)  # the trainer's (autocast on 1 GPU)
        self.tokenizer = build_tokenizer(config.model.tokenizer_path)
        dp_mesh = dims.mesh_for("dp")
        self.dp_rank, self.dp_degree = dp_mesh.get_local_rank(), dp_mesh.size()
        self.dp_group = dp_mesh.get_group() if dist.is_initialized() else None
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.output_folder = Path(dump_folder) / "eval"

    def shard(self) -> list[int]:
        """Indices of the samples this rank captions: round-robin, padded to the same count on every rank."""
        mine = list(range(self.dp_rank, len(self.samples), self.dp_degree))
        per_rank = -(-len(self.samples) // self.dp_degree)
        return mine + [mine[-1] if mine else 0] * (per_rank - len(mine))

    def maybe_run(self, step: int) -> tuple[dict, float]:
        if not self.enabled or step % self.config.interval:
            return {}, 0.0
        start = time.perf_counter()
        captions = self.caption(self.shard())
        cider = self.score(step, captions)
        seconds = time.perf_counter() - start
        if self.rank == 0:
            logger.info(f"step {step}: eval CIDEr {cider:.4f} on {len(self.samples)} images ({seconds:.1f} s)")
        return {"eval_cider": cider}, seconds

    def caption(self, indices: list[int]) -> dict[int, str]:
        """Captions of the given samples (sample index -> text); the same number of forward passes on every rank."""
        from torch.distributed.fsdp import FSDPModule

        from titanmm.generate import GenerationConfig, build_prompt, eos_token_ids, generate

        model = self.model
        config = GenerationConfig(max_new_tokens=self.config.max_new_tokens, fixed_steps=self.dp_degree > 1,
                                  eos_token_ids=eos_token_ids(model, self.tokenizer, self.chat_template))
        fsdp_units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        was_training = model.training
        model.eval()
        if isinstance(model, FSDPModule):
            model.unshard()
        captions: dict[int, str] = {}
        try:
            with torch.compiler.set_stance("force_eager"), self.mixed_precision:
                for first in range(0, len(indices), self.config.batch_size):
                    batch = indices[first:first + self.config.batch_size]
                    prompts, pixels = [], []
                    for index in batch:
                        sample = self.samples[index]
                        ids, pixel_values = build_prompt(self.prompt, self.tokenizer, chat_template=self.chat_template,
                                                         model=model, images=[image() for image in sample.images])
                        prompts.append(ids)
                        pixels.append(pixel_values)
                    out = generate(model, prompts, pixel_values=torch.cat(pixels).to(self.device),
                                   tokenizer=self.tokenizer, config=config)
                    captions.update((index, text.strip()) for index, text in zip(batch, out.texts))
        finally:
            for unit in fsdp_units:
                unit.reshard()
            model.train(was_training)
        return captions

    def score(self, step: int, captions: dict[int, str]) -> float:
        """CIDEr of all ranks' captions, computed on rank 0 and shared with every rank."""
        gathered = [captions]
        if self.dp_group is not None and self.dp_degree > 1:
            gathered = [None] * self.dp_degree
            dist.all_gather_object(gathered, captions, group=self.dp_group)
        cider = None
        if self.rank == 0:
            from eval.metrics import cider as cider_score

            merged = {index: text for part in gathered for index, text in part.items()}
            predictions = {self.samples[i].id: merged[i] for i in range(len(self.samples))}
            references = {s.id: s.answer for s in self.samples}
            cider = cider_score(predictions, references)
            self.output_folder.mkdir(parents=True, exist_ok=True)
            with open(self.output_folder / f"step-{step}.jsonl", "w", encoding="utf-8") as f:
                for sample in self.samples:
                    f.write(json.dumps({"image_id": sample.id, "caption": predictions[sample.id],
                                        "references": sample.answer}, ensure_ascii=False) + "\n")
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [cider]
            dist.broadcast_object_list(box, src=0)
            cider = box[0]
        return float(cider)
