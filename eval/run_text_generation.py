"""Generate a benchmark's answers with a titanmm checkpoint, resumably, on one or many data-parallel ranks.

    python -m eval.run_text_generation --task TextVQA --checkpoint CKPT --input-image-path train_images \\
        --gt-path TextVQA_0.5.1_val.json --output-path results/ --chat-template llama3 [--score]
    torchrun --nproc_per_node 8 -m eval.run_text_generation ...   # 8 ranks, each a disjoint share
    python -m eval.score --task TextVQA --predictions results/TextVQA-predictions.json \\
        --groundtruth results/TextVQA-groundtruth.json

Tasks: captioning (COCO Karpathy test, Flickr30k), TextVQA, VQAv2, ChartQA, SPDocVQA, InfoVQA, AI2D,
OCRBench, MathVista, MMMU, RealworldQA. `eval/tasks/` describes, per task, the input files it reads, its
prompt (the system prompt and wording of Megatron-LM's examples/multimodal recipes) and its records.

How a run goes:

1. The task's samples are read; `--num-partitions / --partition-id / --num-samples-per-partition` keep one
   slice of them, as Megatron's run_text_generation.py does (`--num-samples-per-partition N` alone keeps
   the first N).
2. Samples that already have a record in an `OUT/{prefix}-rank*.jsonl` file are done; the others are dealt
   round-robin to the data-parallel ranks (each rank loads the whole model; under torchrun every rank is a
   data-parallel rank). A rerun after a crash or a preemption therefore only generates what is missing,
   whatever the number of ranks. `OUT/{prefix}-settings.json` records the settings that change outputs; a
   rerun with different ones stops unless given --overwrite (which discards the earlier results).
3. Each rank generates batches of `--batch-size` prompts (`titanmm.generate`: left-padded, KV cache) and
   appends one JSON record per sample to its own `OUT/{prefix}-rank{r}.jsonl`, flushed after each batch.
4. Rank 0 merges all records in sample order into `OUT/{prefix}-predictions.json` and writes the ground
   truth of the same samples as `OUT/{prefix}-groundtruth.json`, both in the formats `python -m eval.score`
   reads; with --score it scores them with `eval.score` and writes `OUT/{prefix}-scores.json`.

`prefix` is the task name, plus `-partition{P}` with --num-partitions.

Greedy decoding (the default) gives the same text whatever the rank count and batch size (up to float
rounding between padded batch shapes). With sampling (--temperature > 0) the draws depend on the batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist

from eval.tasks import TASKS, Sample, Task, TaskInputs, get_task

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.run_text_generation", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--checkpoint", required=True, help="titanmm checkpoint folder or run folder (latest step)")
    p.add_argument("--input-image-path", default="", help="image folder, or the folder of a dataset saved with "
                   "datasets.save_to_disk (MMMU, MathVista, RealworldQA, AI2D)")
    p.add_argument("--gt-path", default="", help="annotation / ground-truth file (JSON or JSONL)")
    p.add_argument("--question-path", default="", help="VQAv2: the official questions file")
    p.add_argument("--split", default="", help="split of a Karpathy JSON or saved DatasetDict (default: the "
                   "task's: test, testmini for MathVista, validation for MMMU)")
    p.add_argument("--output-path", required=True, help="output folder")
    p.add_argument("--tokenizer", default=None, help="tokenizer path (default: the checkpoint's)")
    p.add_argument("--chat-template", "--prompt-format", dest="chat_template", default=None,
                   help="chat template (llama3, llama3.1, mistral, chatml, qwen2, nvlm-yi-34b); default: none, "
                        "the prompt is bos + the user text")
    p.add_argument("--system-prompt", default=None,
                   help="system prompt with a chat template (default: the task's; '' for none)")
    p.add_argument("--use-tiling", action="store_true", help="tile images (the checkpoint's tiling strategy, "
                   "else InternVL's); default: the checkpoint's image settings")
    p.add_argument("--max-num-tiles", type=int, default=None, help="most tiles per image")
    p.add_argument("--use-thumbnail", action="store_true", help="add a thumbnail tile to tiled images")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (per rank)")
    p.add_argument("--max-new-tokens", "--out-seq-length", dest="max_new_tokens", type=int, default=None,
                   help="default: the task's (captioning 32, OCRBench / MathVista / MMMU 64, others 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-partitions", type=int, default=0, help="split the samples into this many partitions")
    p.add_argument("--partition-id", type=int, default=0, help="the partition to run")
    p.add_argument("--num-samples-per-partition", type=int, default=0,
                   help="partition size (0: even split); without --num-partitions: run the first N samples")
    p.add_argument("--num-workers", type=int, default=0, help="processes preparing prompts and images")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; under torchrun the "
                   "local rank's GPU)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--compile", action="store_true", help="compiled decode step (titanmm.generate; CUDA graphs on "
                   "GPU): faster decoding after a one-time compile")
    p.add_argument("--score", action="store_true", help="score the merged predictions with eval.score")
    p.add_argument("--no-meteor", action="store_true", help="captioning --score: skip METEOR")
    p.add_argument("--overwrite", action="store_true", help="discard earlier results in --output-path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_args(args) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_partitions < 0 or (args.num_partitions and not 0 <= args.partition_id < args.num_partitions):
        raise ValueError(f"--partition-id {args.partition_id} is not in [0, --num-partitions {args.num_partitions})")
    if args.num_samples_per_partition < 0:
        raise ValueError("--num-samples-per-partition must be >= 0")
    if args.max_num_tiles is not None and args.max_num_tiles < 1:
        raise ValueError("--max-num-tiles must be >= 1")
    if args.score and args.task == "captioning":  # fail before generating, not after
        import importlib.util
        import shutil

        if importlib.util.find_spec("pycocoevalcap") is None or shutil.which("java") is None:
            raise ValueError("--score for captioning needs pycocoevalcap (pip install -e '.[eval]') and Java; "
                             "run without --score and score elsewhere with python -m eval.score")


# ------------------------------------------------------------------------------------------------
# Samples and output files
# ------------------------------------------------------------------------------------------------

def partition(samples: list[Sample], num_partitions: int, partition_id: int, per_partition: int) -> list[Sample]:
    """Megatron's `_get_partition_bounds`: `per_partition` samples from `partition_id * per_partition`, or
    (per_partition == 0) the partition_id-th of `num_partitions` near-equal slices."""
    if num_partitions == 0:
        return samples[:per_partition] if per_partition else samples
    if per_partition:
        return samples[per_partition * partition_id:per_partition * (partition_id + 1)]
    import numpy as np

    bounds = [int(x) for x in np.linspace(0, len(samples), num_partitions + 1)]
    return samples[bounds[partition_id]:bounds[partition_id + 1]]


class OutputFiles:
    """The files of one task (and partition) in the output folder."""

    def __init__(self, folder: Path, prefix: str):
        self.folder, self.prefix = folder, prefix
        self.predictions, self.groundtruth, self.scores, self.settings = (
            folder / f"{prefix}-{kind}.json" for kind in ("predictions", "groundtruth", "scores", "settings"))

    def part(self, rank: int) -> Path:
        """The partial records of one rank."""
        return self.folder / f"{self.prefix}-rank{rank}.jsonl"

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.prefix}-rank*.jsonl"))


def read_records(paths: Sequence[Path]) -> dict[str, dict]:
    """Records of partial files by str(sample_id); the first record of an id wins; a cut-off line is skipped."""
    records: dict[str, dict] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a killed run
                records.setdefault(str(record["sample_id"]), record)
    return records


def open_for_append(path: Path):
    """Append mode, after cutting off a partial last line left by a killed run."""
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _settings(args, task: Task, checkpoint_dir: Path, image_args, max_new_tokens: int, system: str) -> dict:
    """What changes the generated text (a rerun into the same folder must use the same)."""
    return {"task": task.name, "checkpoint": str(checkpoint_dir.resolve()),
            "input_image_path": args.input_image_path, "gt_path": args.gt_path, "question_path": args.question_path,
            "split": args.split, "partition": [args.num_partitions, args.partition_id, args.num_samples_per_partition],
            "tokenizer": args.tokenizer, "chat_template": args.chat_template, "system_prompt": system,
            "image": image_args.to_dict() if image_args is not None else None, "max_new_tokens": max_new_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed,
            "dtype": args.dtype}


def _prepare_output(files: OutputFiles, settings: dict, overwrite: bool) -> tuple[set[str], str]:
    """(ids already done, error message or ""); rank 0 only."""
    files.folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in files.parts() + [files.predictions, files.groundtruth, files.scores]:
            path.unlink(missing_ok=True)
    if files.parts() and files.settings.exists():
        previous = json.loads(files.settings.read_text())
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            return set(), (f"{files.folder} holds {files.prefix} results made with other settings "
                           f"({', '.join(f'{k}: {previous.get(k)!r} -> {settings.get(k)!r}' for k in changed)}); "
                           "pass --overwrite to discard them, or choose another --output-path")
    write_json(files.settings, settings)
    return set(read_records(files.parts())), ""


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------

def image_args_for(model, args):
    """The checkpoint's image settings changed by --use-tiling / --max-num-tiles / --use-thumbnail (None: as is)."""
    image = model.args.image
    changes = {}
    if args.use_tiling and image.tiling == "none":
        changes["tiling"] = "internvl"
    if args.max_num_tiles is not None:
        changes["max_tiles"] = args.max_num_tiles
        changes["min_tiles"] = min(image.min_tiles, args.max_num_tiles)
    if args.use_thumbnail:
        changes["use_thumbnail"] = True
    return dataclasses.replace(image, **changes) if changes else None


class PromptBuilder:
    """Token ids and pixel values of a sample's prompt (run in DataLoader workers with --num-workers)."""

    def __init__(self, model, tokenizer, chat_template: str | None, system: str | None, image_args):
        self.model, self.tokenizer = model, tokenizer
        self.chat_template, self.system, self.image_args = chat_template, system, image_args

    def __call__(self, sample: Sample) -> tuple[list[int], torch.Tensor | None]:
        from titanmm.generate import build_prompt

        images = [image() if callable(image) else image for image in sample.images]
        images = [image for image in images if image is not None]
        try:
            return build_prompt(sample.question, self.tokenizer, chat_template=self.chat_template, model=self.model,
                                images=images, system=self.system, image_args=self.image_args)
        except Exception as e:
            raise RuntimeError(f"sample {sample.id!r}: {type(e).__name__}: {e}") from e


class _PromptDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample], builder: PromptBuilder):
        self.samples, self.builder = samples, builder

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        return index, *self.builder(self.samples[index])


def generate_batch(model, tokenizer, items: list, config) -> list[str]:
    """Texts for [(index, ids, pixel_values)], one generate call per tile shape (tiles are stacked per call)."""
    from titanmm.generate import generate

    groups: dict = {}
    for position, (_, _, pixels) in enumerate(items):
        key = None if pixels is None else tuple(pixels.shape[-2:])
        groups.setdefault(key, []).append(position)
    if len(groups) > 1 and None in groups:  # text-only prompts can join any group
        groups[next(k for k in groups if k is not None)] += groups.pop(None)
    texts: list[str] = [""] * len(items)
    for positions in groups.values():
        positions.sort()
        pixels = [items[p][2] for p in positions if items[p][2] is not None]
        out = generate(model, [items[p][1] for p in positions], tokenizer=tokenizer, config=config,
                       pixel_values=torch.cat(pixels) if pixels else None)
        for p, text in zip(positions, out.texts):
            texts[p] = text.strip()
    return texts


def _distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device); a process group only under a multi-process launcher."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from titanmm.distributed import init_distributed

        rank, world, device = init_distributed()
        return rank, world, torch.device("cpu") if device_arg == "cpu" else device
    default = "cuda" if torch.cuda.is_available() else "cpu"
    return 0, 1, torch.device(device_arg or default)


def _broadcast(obj, rank: int):
    if not dist.is_initialized():
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run(args, model=None, tokenizer=None) -> dict:
    """The whole run (see the module docstring); returns the output paths (and the scores) on rank 0.

    `model` / `tokenizer`: already loaded ones (e.g. to evaluate several tasks in one process); by default
    they are loaded from --checkpoint (and --tokenizer or the checkpoint's tokenizer).
    """
    import titanmm
    from titanmm.checkpoint.format import read_meta, resolve_checkpoint_dir
    from titanmm.data.tokenizer import build_tokenizer
    from titanmm.generate import GenerationConfig, eos_token_ids

    check_args(args)
    task = get_task(args.task)
    rank, world, device = _distributed(args.device)
    try:
        samples = task.load(TaskInputs(args.input_image_path, args.gt_path, args.question_path, args.split))
        samples = partition(samples, args.num_partitions, args.partition_id, args.num_samples_per_partition)
        if len({str(s.id) for s in samples}) != len(samples):
            raise ValueError(f"{task.name}: the inputs hold duplicate sample ids")
        checkpoint_dir = resolve_checkpoint_dir(args.checkpoint)
        meta = read_meta(checkpoint_dir)
        if tokenizer is None:
            tokenizer = build_tokenizer(args.tokenizer if args.tokenizer is not None else meta.get("tokenizer", ""))
        if model is None:
            model = titanmm.load(checkpoint_dir, dtype=_DTYPES[args.dtype], device=device)
        if not hasattr(model, "encode_images"):
            raise ValueError(f"{task.name} needs a vision-language checkpoint; {checkpoint_dir} holds a "
                             f"{meta['model_name']!r} model")
        image_args = image_args_for(model, args)
        system = task.system_prompt if args.system_prompt is None else args.system_prompt
        system = system if args.chat_template else ""  # without a template the prompt is bos + the user text
        max_new_tokens = task.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
        settings = _settings(args, task, checkpoint_dir, image_args, max_new_tokens, system)
        prefix = task.name if args.num_partitions == 0 else f"{task.name}-partition{args.partition_id}"
        files = OutputFiles(Path(args.output_path), prefix)
        done, error = _broadcast(_prepare_output(files, settings, args.overwrite) if rank == 0 else None, rank)
        if error:
            raise ValueError(error)

        position = {str(s.id): i for i, s in enumerate(samples)}
        mine = [s for s in samples if str(s.id) not in done][rank::world]
        if rank == 0:
            print(f"{task.name}: {len(samples)} samples, {len(done & set(position))} already done, "
                  f"{len(samples) - len(done & set(position))} to generate on {world} rank(s) -> {files.folder}",
                  flush=True)
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, eos_token_ids=eos_token_ids(model, tokenizer, args.chat_template),
                                  compile=getattr(args, "compile", False))
        builder = PromptBuilder(model, tokenizer, args.chat_template, system or None, image_args)
        loader = torch.utils.data.DataLoader(_PromptDataset(mine, builder), batch_size=args.batch_size,
                                             num_workers=args.num_workers, collate_fn=list)
        from tqdm import tqdm

        with open_for_append(files.part(rank)) as out, \
                tqdm(total=len(mine), desc=task.name, unit="sample", disable=rank != 0 or args.no_progress) as bar:
            for items in loader:
                batch = [mine[index] for index, _, _ in items]
                batch_config = dataclasses.replace(config, seed=args.seed + position[str(batch[0].id)])
                texts = generate_batch(model, tokenizer, items, batch_config)
                for sample, text in zip(batch, texts):
                    out.write(json.dumps(task.record(sample, text), ensure_ascii=False) + "\n")
                out.flush()
                bar.update(len(batch))
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank != 0:
        return {}
    return merge(task, samples, files, args)


def merge(task: Task, samples: list[Sample], files: OutputFiles, args) -> dict:
    """Write the merged predictions and the ground truth (and the scores with --score)."""
    records = read_records(files.parts())
    missing = [s.id for s in samples if str(s.id) not in records]
    if missing:
        raise RuntimeError(f"{len(missing)} sample(s) have no record in {files.folder}, e.g. {missing[:5]}")
    write_json(files.predictions, task.predictions([records[str(s.id)] for s in samples]))
    result = {"predictions": str(files.predictions)}
    groundtruth = task.groundtruth(samples)
    if groundtruth is not None:
        write_json(files.groundtruth, groundtruth)
        result["groundtruth"] = str(files.groundtruth)
    if args.score:
        if groundtruth is None:
            raise ValueError(f"--score: the {task.name} inputs have no answers")
        from eval.score import run as score_run

        scores = {"task": task.name, **score_run(argparse.Namespace(
            task=task.name, predictions=str(files.predictions), groundtruth=str(files.groundtruth), subset=False,
            no_meteor=args.no_meteor, first_choice_fallback=True))}
        write_json(files.scores, scores)
        print(json.dumps(scores, indent=2), flush=True)
        result["scores"] = scores
    print(f"{task.name}: predictions in {files.predictions}", flush=True)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
