"""`python -m titanmm.demo`: a vision-language model learns, from scratch and in a few CPU minutes, to caption
and answer questions about images it has never seen - through titanmm's real tools, end to end.

    python -m titanmm.demo [--output outputs/demo] [--device auto|cpu|cuda] [--quick] [--nproc N]

The pipeline (each step is what a user runs by hand on real data):

1. Data (`shapes.py`): 64x64 scenes of 1-3 coloured shapes, rendered deterministically from the seed, as
   PNGs and LLaVA JSON: one caption record per training image (stage 1) and one multi-turn conversation of
   questions and the caption request per training image (stage 2); a disjoint held-out split for scoring.
2. `titanmm.data.convert_llava`: LLaVA JSON -> WebDataset shards -> `energon prepare`, once per stage.
3. Stage 0 (`configs/stage0_lm.toml`): `python -m titanmm.train` trains the `demo_lm` language model on
   text (`data/lm_text.jsonl`).
4. Combine (`converters.combine`): the stage-0 language model + a freshly initialised CLIP-like tower +
   a fresh projector -> a `demo_vlm` checkpoint.
5. Stage 1 (`configs/stage1_projector.toml`): projector pretraining on captions, `freeze = ["vision", "lm"]`,
   task "captioning", starting from the combined checkpoint (`checkpoint.initial_load_path`).
6. Stage 2 (`configs/stage2_sft.toml`): instruction tuning on the conversations, `freeze = ["vision"]`, task
   "sft", starting from stage 1's checkpoint.
7. Evaluation (`evaluate.py`): greedy captions and answers for every held-out image with
   `titanmm.generate`, scored with CIDEr (`eval.metrics.cider`) and VQA accuracy (`eval.metrics.vqa_accuracy`):
   for the untrained model (fresh `demo_vlm` weights), after stage 1 (captions) and after stage 2.
8. Report: a few held-out samples, `loss_curves.png` (all stages), `demo_result.json`.

Training stages run as `python -m titanmm.train` subprocesses (`torchrun` with `--nproc` > 1), exactly as
from a shell; the configs they use are the TOML files next to this module, with the paths, step counts
and batch split given as `--section.key=value` overrides (printed before each stage).

Why a stage 0, and why its text lists the objects. LLaVA's stage 1 trains only the projector: a frozen,
pretrained language model already knows the language and how to use what is in its context, so the
projector merely has to put the image there in a form the model reads. A language model of 1.5M
parameters has no such pretraining. Starting stage 1 from a random language model cannot work (a
frozen random model cannot be made to produce any caption), and - as measured while designing this
demo - a language model trained on the captions alone does not help either: it learns their
distribution but never to look at its context, so the projector loss stays flat. Stage 0 therefore
trains the language model on what a larger model would have learned from the web: to turn a
description in its context into sentences. Each document lists the objects of a training scene
("red circle top left, blue square center"), a newline, and then the caption, or a question and
its answer, laid out exactly as the "plain" chat template lays out the image samples of stages 1
and 2, with the list where the image tokens will be. The projector then only has to map the image
into something the model reads like that list. (The held-out scenes are never written as text.)

Why the vision tower stays frozen and random. There is no pretrained tower this small, and the demo
keeps LLaVA's recipe (the tower frozen in both stages): the tiny ViT's random patch features still
carry colour, shape and position (a random projection of each 8x8 patch plus position embeddings),
and the projector and language model learn to read them.

Sizes (`--quick` for CI; each count can be overridden): see `FULL` and `QUICK`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import titanmm
from titanmm.demo.evaluate import EvalResult, evaluate
from titanmm.demo.report import format_samples, plot_stage_losses
from titanmm.demo.shapes import DemoDataset, write_dataset

logger = logging.getLogger("titanmm.demo")

CONFIGS = Path(__file__).resolve().parent / "configs"
PACKAGE_ROOT = Path(titanmm.__file__).resolve().parents[1]
FLAVOR = "demo_vlm"
# What the demo writes inside --output (removed at the start of a run: a stale checkpoint folder would make
# a training stage resume instead of train).
OUTPUT_ENTRIES = ("data", "stage0_lm", "vision_init", "vlm_init", "stage1_projector", "stage2_sft",
                  "loss_curves.png", "samples.txt", "demo_result.json")


@dataclass(frozen=True)
class DemoSize:
    train_images: int
    heldout_images: int
    stage0_steps: int
    stage1_steps: int
    stage2_steps: int
    batch_size: int = 32
    """Global batch of every stage (split over --nproc ranks)."""
    warmup_steps: int = 20


FULL = DemoSize(train_images=3000, heldout_images=200, stage0_steps=300, stage1_steps=300, stage2_steps=400)
QUICK = DemoSize(train_images=800, heldout_images=40, stage0_steps=80, stage1_steps=40, stage2_steps=80,
                 warmup_steps=10)


@dataclass(frozen=True)
class Stage:
    name: str
    """Folder under --output and key in demo_result.json."""
    title: str
    config: Path


STAGES = (Stage("stage0_lm", "stage 0: language model (text)", CONFIGS / "stage0_lm.toml"),
          Stage("stage1_projector", "stage 1: projector (captions)", CONFIGS / "stage1_projector.toml"),
          Stage("stage2_sft", "stage 2: instruction tuning", CONFIGS / "stage2_sft.toml"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m titanmm.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", type=Path, default=Path("outputs/demo"), help="folder for data, checkpoints and results")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when a GPU is visible, else cpu")
    p.add_argument("--nproc", type=int, default=1, help="training processes (torchrun, data parallel)")
    p.add_argument("--quick", action="store_true", help="the small CI size (QUICK instead of FULL)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and of every stage")
    for name in ("train_images", "heldout_images", "stage0_steps", "stage1_steps", "stage2_steps", "batch_size"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"override the size's {name}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    return name


# ----------------------------------------------------------------------------------------------
# Steps of the pipeline
# ----------------------------------------------------------------------------------------------

def prepare_data(root: Path, size: DemoSize, seed: int, progress: bool) -> tuple[DemoDataset, Path, Path]:
    """Scenes -> PNGs + LLaVA JSON -> two prepared energon datasets (captions, conversations)."""
    from titanmm.data.convert_llava import convert

    dataset = write_dataset(root, size.train_images, size.heldout_images, seed=seed, progress=progress)
    energon = {}
    for name, records in (("energon_caption", dataset.caption_json), ("energon_sft", dataset.sft_json)):
        energon[name] = root / name
        # `energon prepare` reports what it found on stdout: kept in a log next to the dataset
        with open(root / f"{name}.log", "w") as log, contextlib.redirect_stdout(log):
            stats = convert(records, dataset.images, energon[name], shard_size=500, seed=seed, num_workers=1,
                            progress=progress)
        print(f"{records.name} -> {energon[name]}: {stats.get('written_train', 0)} samples in "
              f"{len(stats['train_shards'])} shards (energon prepare: {root / f'{name}.log'})", flush=True)
    return dataset, energon["energon_caption"], energon["energon_sft"]


def stage_command(stage: Stage, overrides: list[str], nproc: int) -> list[str]:
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        launcher = [sys.executable]
    return launcher + ["-m", "titanmm.train", "--config", str(stage.config), *overrides]


def stage_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer takes a GPU whenever it sees one
    return env


def run_stage(stage: Stage, overrides: list[str], dump_folder: Path, nproc: int, device: str) -> float:
    """Run one training stage as a subprocess, its output shown with a prefix and kept in train.log."""
    command = stage_command(stage, [f"--job.dump_folder={dump_folder}", *overrides], nproc)
    print(f"\n== {stage.title}\n$ {' '.join(command)}", flush=True)
    dump_folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(dump_folder / "train.log", "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=stage_env(device), cwd=os.getcwd())
        for line in proc.stdout:
            log.write(line)
            if not _noise(line):
                print(f"  [{stage.name}] {line}", end="", flush=True)
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"{stage.title} failed with exit status {code}; see {dump_folder / 'train.log'}")
    return time.perf_counter() - start


def _noise(line: str) -> bool:
    """Lines of a stage's output not worth showing (they stay in train.log)."""
    return "Warning" in line or "warnings.warn" in line or line.startswith(" ") or not line.strip()


def build_initial_vlm(lm_checkpoint: Path, output: Path, seed: int) -> Path:
    """`converters.combine`: the stage-0 language model + a fresh tower (saved first) + a fresh projector."""
    from converters.combine import combine
    from titanmm.checkpoint.format import save_model
    from titanmm.models import get_model_spec
    from titanmm.models.vlm.flavors import VLM_FLAVORS

    args = VLM_FLAVORS[FLAVOR]
    vision = get_model_spec(args.vision_model).model_cls(args.vision)
    vision.init_weights(seed)
    save_model(vision, output / "vision_init", args.vision_model, args.vision)
    return combine(lm_checkpoint, output / "vision_init", output / "vlm_init", flavor=FLAVOR, seed=seed,
                   progress=False)


def untrained_model(seed: int, device: str):
    """The demo VLM as training would start it without any stage: every weight freshly initialised."""
    from titanmm.models import get_model_spec

    spec = get_model_spec("vlm")
    model = spec.model_cls(spec.flavors[FLAVOR])
    model.init_weights(seed=seed)
    return model.to(device).eval()


def last_losses(metrics_path: Path) -> tuple[float, float]:
    from titanmm.metrics import read_jsonl

    losses = [r["loss"] for r in read_jsonl(str(metrics_path)) if r.get("loss") is not None]
    return losses[0], losses[-1]


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    size = QUICK if args.quick else FULL
    size = replace(size, **{k: getattr(args, k) for k in asdict(size) if getattr(args, k, None) is not None})
    if size.batch_size % args.nproc:
        raise SystemExit(f"--batch-size {size.batch_size} is not divisible by --nproc {args.nproc}")
    device = resolve_device(args.device)
    progress = not args.no_progress
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    for entry in OUTPUT_ENTRIES:
        path = output / entry
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    print(f"titanmm demo ({'quick' if args.quick else 'full'}): {size}\n  device {device}, {args.nproc} training "
          f"process(es), {torch.get_num_threads()} CPU threads, output {output}", flush=True)

    # 1-2. data
    t = time.perf_counter()
    dataset, energon_caption, energon_sft = prepare_data(output / "data", size, args.seed, progress)
    seconds["data"] = time.perf_counter() - t
    heldout = json.loads(dataset.heldout_json.read_text())
    tokenizer = _tokenizer()

    # the untrained model, scored exactly as the trained one will be
    t = time.perf_counter()
    untrained = evaluate(untrained_model(args.seed, device), tokenizer, heldout, dataset.images, progress=progress)
    seconds["eval_untrained"] = time.perf_counter() - t
    print(f"untrained model: CIDEr {untrained.cider:.3f}, VQA accuracy {untrained.vqa_accuracy:.3f}", flush=True)

    common = [f"--training.seed={args.seed}", f"--training.global_batch_size={size.batch_size}",
              f"--training.local_batch_size={size.batch_size // args.nproc}"]

    def steps(n: int) -> list[str]:
        return [f"--training.steps={n}", f"--lr_scheduler.warmup_steps={min(size.warmup_steps, max(1, n // 5))}"]

    # 3. stage 0: the language model on text
    s0, s1, s2 = STAGES
    seconds[s0.name] = run_stage(s0, common + steps(size.stage0_steps) + [f"--training.dataset={dataset.lm_text}"],
                                 output / s0.name, args.nproc, device)
    # 4. combine
    t = time.perf_counter()
    vlm_init = build_initial_vlm(output / s0.name / "checkpoint", output, args.seed)
    seconds["combine"] = time.perf_counter() - t
    # 5. stage 1: projector on captions
    seconds[s1.name] = run_stage(s1, common + steps(size.stage1_steps) + [
        f"--training.dataset={energon_caption}", f"--checkpoint.initial_load_path={vlm_init}"],
        output / s1.name, args.nproc, device)
    t = time.perf_counter()
    stage1 = evaluate(titanmm.load(output / s1.name / "checkpoint", device=device), tokenizer, heldout,
                      dataset.images, caption_prompt="", questions=False, progress=progress)
    seconds["eval_stage1"] = time.perf_counter() - t
    print(f"after stage 1: CIDEr {stage1.cider:.3f} (captions only: no questions learned yet)", flush=True)
    # 6. stage 2: instruction tuning
    seconds[s2.name] = run_stage(s2, common + steps(size.stage2_steps) + [
        f"--training.dataset={energon_sft}", f"--checkpoint.initial_load_path={output / s1.name / 'checkpoint'}"],
        output / s2.name, args.nproc, device)
    # 7. evaluation
    t = time.perf_counter()
    final = evaluate(titanmm.load(output / s2.name / "checkpoint", device=device), tokenizer, heldout,
                     dataset.images, progress=progress)
    seconds["eval_final"] = time.perf_counter() - t

    # 8. report
    plot = plot_stage_losses([(s.title, output / s.name / "metrics.jsonl") for s in STAGES],
                             output / "loss_curves.png")
    samples = format_samples(heldout, final, untrained)
    (output / "samples.txt").write_text(samples + "\n")
    seconds["total"] = time.perf_counter() - started
    result = build_result(args, size, device, dataset, untrained, stage1, final, output, seconds)
    (output / "demo_result.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n== held-out samples (images never seen in training)\n" + samples)
    print(summary_table(untrained, stage1, final))
    print(f"\nloss curves: {plot}\nresult: {output / 'demo_result.json'}\n"
          f"total time {seconds['total']:.0f} s (training {sum(seconds[s.name] for s in STAGES):.0f} s)")
    return result


def _tokenizer():
    from titanmm.data.tokenizer import build_tokenizer

    return build_tokenizer("")  # the shipped tokenizer, as every stage config says (model.tokenizer_path = "")


def build_result(args, size: DemoSize, device: str, dataset: DemoDataset, untrained: EvalResult,
                 stage1: EvalResult, final: EvalResult, output: Path, seconds: dict) -> dict:
    losses = {s.name: last_losses(output / s.name / "metrics.jsonl") for s in STAGES}
    return {
        "cider": final.cider,
        "vqa_accuracy": final.vqa_accuracy,
        "vqa_accuracy_by_type": final.vqa_by_type,
        "untrained_cider": untrained.cider,
        "untrained_vqa_accuracy": untrained.vqa_accuracy,
        "untrained_vqa_accuracy_by_type": untrained.vqa_by_type,
        "stage1_cider": stage1.cider,
        "steps": {"stage0_lm": size.stage0_steps, "stage1_projector": size.stage1_steps,
                  "stage2_sft": size.stage2_steps},
        "first_loss": {name: first for name, (first, _) in losses.items()},
        "last_loss": {name: last for name, (_, last) in losses.items()},
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "mode": "quick" if args.quick else "full",
        "size": asdict(size),
        "device": device,
        "nproc": args.nproc,
        "cpu_threads": torch.get_num_threads(),
        "seed": args.seed,
        "heldout_images": final.num_images,
        "heldout_questions": final.num_questions,
        "heldout_layouts_seen_in_train": dataset.heldout_layouts_seen_in_train,
        "samples": [{"image": r["image"], "layout": r["layout"], "reference": r["references"][0],
                     "caption": final.captions[r["id"]],
                     "qa": [{"question": q["question"], "answer": q["answer"], "model": a}
                            for q, a in zip(r["questions"], final.answers[r["id"]])]}
                    for r in json.loads(dataset.heldout_json.read_text())[:4]],
        "files": {"loss_curves": str(output / "loss_curves.png"), "samples": str(output / "samples.txt"),
                  "final_checkpoint": str(output / "stage2_sft" / "checkpoint")},
    }


def summary_table(untrained: EvalResult, stage1: EvalResult, final: EvalResult) -> str:
    rows = [("untrained model", untrained.cider, untrained.vqa_accuracy),
            ("after stage 1 (captions only)", stage1.cider, None),
            ("after stage 2 (final)", final.cider, final.vqa_accuracy)]
    lines = [f"\n== held-out scores ({final.num_images} images, {final.num_questions} questions)",
             f"{'':32}{'CIDEr':>8}{'VQA acc':>10}"]
    for name, cider, vqa in rows:
        lines.append(f"{name:32}{cider:8.3f}{'-' if vqa is None else f'{vqa:.3f}':>10}")
    lines.append("VQA accuracy by question type: " + ", ".join(f"{k} {v:.2f}" for k, v in final.vqa_by_type.items()))
    return "\n".join(lines)
