"""Throughput of titanmm's image-text data loader on this CPU, through the trainer's own pipeline (~4.5 minutes).

    python benchmarks/vlm_loader.py [--images 128] [--seconds 20] [--workers 1 2] [--cases ...]

Data. In a temp dir: `--images` COCO-like JPEGs (640x480, 640x427 and 480x640; smooth random colour fields plus
grain, quality 90, ~110 KB each, about COCO's average file size) and two LLaVA JSON files over them: LLaVA-Pretrain-
like captions (one turn, a 8-30 word caption) and LLaVA-665K-like conversations (1-6 turns of a question and a
1-60 word answer). Both are converted by `titanmm.data.convert_llava` (WebDataset shards + `energon prepare`).

Loader. `titanmm.data.vlm_data.VLMData`, exactly as the trainer builds it: energon `get_train_dataset` +
`get_savable_loader` over `VLMTaskEncoder` (JPEG decoding, EXIF / mode handling, tile budget, resize, crop /
tiles, normalisation, chat-template tokenization, packing, batching) in `multimodal.num_workers` worker processes,
shuffle buffer 100. The shipped 2048-token tokenizer with the `plain` template stands in for Mistral's (text is
a small part of the work); the image token id is one the shipped tokenizer never produces.

Cases (all read for each `--workers` count):

* `clip336_pretrain`: LLaVA stage 1 as measured on an H100 (18.7 samples/s at batch 8, seq_len 1024): CLIP-336
  (one 336 px tile, 576 tokens), task captioning, seq_len 1024, batch 8, no packing.
* `clip336_sft_packed`: LLaVA stage 2: CLIP-336, task sft, seq_len 4096, packing with the default
  packing_buffer_size, batch 1 (one packed row per micro-batch).
* `internvit448_12tiles_sft`: InternViT-448 dynamic tiling with up to 12 tiles + thumbnail (256 tokens per tile,
  NVLM tags), task sft, seq_len 4096, batch 1, no packing (a 13-tile image is ~3.4K tokens: one per row).
* `internvit448_12tiles_sft_packed`: the same with packing (default packing_buffer_size): the largest pixels per
  buffered sample, had the buffer held pixels (`--eager-packing` measures that pipeline: up to 30 MB per sample).

Measurement. The loader starts, the first `--warmup` seconds of batches are dropped (worker start, the packing
buffer fill and the shuffle buffer fill are reported as `first_batch_s`, and the CPU seconds the workers used by
then as `first_batch_worker_cpu_s`, which other load on the machine does not inflate), then samples are counted for
`--seconds`. Reported: samples/s, samples/s per worker, and the CPU seconds the worker processes used
(/proc), which give `samples_per_worker_cpu_s`: the rate of one worker on a core of its own, unaffected by other
load on the machine (the load average is recorded), and the trainer process's CPU time per sample (receiving
the batches). `workers_needed` divides a GPU's
demand by the per-worker rate: stage 1 at 18.7 samples/s per GPU, stage 2 at ~4 samples per packed 4096 row x
~1.2 rows/s per H100 = 4.8 samples/s per GPU. With tensor parallelism every rank of a tensor-parallel group runs
its own loader over the same samples, so each GPU must then be fed its group's rate (x tp degree).
`worker_peak_rss_mb` is the largest peak resident set (VmHWM) of the worker processes at the end of the run; a
forked worker starts with the pages of the trainer process (`main_process_rss_mb` when the loader starts), so the
growth beyond that is the worker's own: its buffers (shuffle, packing, prefetched batches) and the freed memory
glibc keeps (with 12-tile images up to ~1.3 GB of freed tiling buffers; `MALLOC_MMAP_THRESHOLD_=131072` returns it).

`--eager-packing` buffers fully encoded samples, pixels included (`VLMTaskEncoder.defer_pixels_when_packing =
False`, the pipeline before the encoding was split around the packing buffer; the same batches), to compare.

Writes benchmarks/results/<date>_cpu_vlm_loader.json (workload, device, date, commit, command, numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from results_io import command_line, commit, cpu_description, write_results  # noqa: E402

STAGE1_SAMPLES_PER_S = 18.7  # LLaVA stage 1 on one H100 (batch 8, seq_len 1024), measured
SFT_SAMPLES_PER_ROW, SFT_ROWS_PER_S = 4, 1.2  # LLaVA SFT at seq_len 4096 with packing, per H100 (estimate)
IMAGE_TOKEN_ID = 2047  # an id the shipped tokenizer never produces from text (the debug flavors' image token)
COCO_SHAPES = ((640, 480), (640, 427), (480, 640), (640, 480))
WORDS = ("the a of man woman dog cat red blue green table street car bus people sitting standing next to on "
         "in front large small white black picture image shows several two three wooden near building sky "
         "water grass holding looking field room kitchen plate food train window open tree").split()


@dataclasses.dataclass(frozen=True)
class Case:
    """One loader configuration."""

    name: str
    data: str  # "captions" or "sft"
    task: str
    seq_len: int
    batch_size: int
    packing: bool
    tiling: str  # "clip336" or "internvit448_12"
    demand: dict  # name -> samples/s one GPU consumes


CASES = {
    "clip336_pretrain": Case("clip336_pretrain", "captions", "captioning", 1024, 8, False, "clip336",
                             {"llava_stage1_h100": STAGE1_SAMPLES_PER_S}),
    "clip336_sft_packed": Case("clip336_sft_packed", "sft", "sft", 4096, 1, True, "clip336",
                               {"llava_sft_seq4096_h100": SFT_SAMPLES_PER_ROW * SFT_ROWS_PER_S}),
    "internvit448_12tiles_sft": Case("internvit448_12tiles_sft", "sft", "sft", 4096, 1, False, "internvit448_12",
                                     {"llava_sft_seq4096_h100": SFT_SAMPLES_PER_ROW * SFT_ROWS_PER_S}),
    "internvit448_12tiles_sft_packed": Case("internvit448_12tiles_sft_packed", "sft", "sft", 4096, 1, True,
                                            "internvit448_12",
                                            {"llava_sft_seq4096_h100": SFT_SAMPLES_PER_ROW * SFT_ROWS_PER_S}),
}


def image_setup(tiling: str):
    """(ImageArgs, image tokens per tile) of a tiling case."""
    from titanmm.models.vlm.args import ImageArgs

    if tiling == "clip336":
        return ImageArgs(preset="clip_336", tile_size=336), 576
    if tiling == "internvit448_12":  # NVLM's tiling and tags, with InternVL-chat's 12 tiles
        return ImageArgs(preset="internvl_448", tile_size=448, tiling="internvl", max_tiles=12, use_thumbnail=True,
                         tile_tags="nvlm", image_start="<Image>", image_end="</Image>"), 256
    raise ValueError(f"unknown tiling {tiling!r}")


# -- data ---------------------------------------------------------------------------------------


def coco_like_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG of a smooth random colour field with grain (compresses like a photo: ~110 KB at 640x480)."""
    from PIL import Image

    coarse = rng.integers(0, 256, (height // 24 + 1, width // 24 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    pixels = np.clip(smooth + rng.normal(0, 10, smooth.shape).astype(np.int16), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def words(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(low, high + 1)))).capitalize() + "."


def write_datasets(root: Path, num_images: int, kinds=("captions", "sft"), seed: int = 0) -> dict:
    """JPEGs + the LLaVA JSONs of `kinds` under `root`, converted to energon datasets; returns paths and sizes."""
    from titanmm.data.convert_llava import convert

    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True)
    sizes = []
    for i in range(num_images):
        data = coco_like_jpeg(rng, *COCO_SHAPES[i % len(COCO_SHAPES)])
        (images / f"{i:06d}.jpg").write_bytes(data)
        sizes.append(len(data))
    captions = [{"id": f"c{i:06d}", "image": f"{i:06d}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nRender a short caption of the image."},
        {"from": "gpt", "value": words(rng, 8, 30)}]} for i in range(num_images)]
    sft = []
    for i in range(num_images):
        turns = []
        for t in range(int(rng.integers(1, 7))):
            question = ("<image>\n" if t == 0 else "") + words(rng, 5, 15).rstrip(".") + "?"
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": words(rng, 1, 60)}]
        sft.append({"id": f"s{i:06d}", "image": f"{i:06d}.jpg", "conversations": turns})
    paths = {}
    for name, records in (("captions", captions), ("sft", sft)):
        if name not in kinds:
            continue
        (root / f"{name}.json").write_text(json.dumps(records))
        with contextlib.redirect_stdout(io.StringIO()):  # energon prepare prints a sample of the data
            convert(root / f"{name}.json", images, root / name, shard_size=max(1, num_images // 8), num_workers=1,
                    progress=False)
        paths[name] = str(root / name)
    return {"paths": paths, "num_images": num_images, "mean_jpeg_kb": round(sum(sizes) / len(sizes) / 1024, 1)}


# -- measurement --------------------------------------------------------------------------------


def _children_stats() -> list[tuple[str, list[str]]] | None:
    """(pid, the /proc/<pid>/stat fields after "(comm)": state, ppid, ..., utime, stime, ...) of this process's
    live child processes (Linux /proc), or None without /proc."""
    me = os.getpid()
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    children = []
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            children.append((pid, fields))
    return children


def children_cpu_seconds() -> float | None:
    """CPU seconds (user + system) used so far by this process's live child processes."""
    children = _children_stats()
    if children is None:
        return None
    return sum(int(fields[11]) + int(fields[12]) for _, fields in children) / os.sysconf("SC_CLK_TCK")


def _status_mb(pid: int | str, field: str) -> float | None:
    """A memory field of /proc/<pid>/status ("VmRSS", "VmHWM", ...) in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def children_peak_rss_mb() -> float | None:
    """The largest peak resident set (VmHWM) of this process's live child processes, in MiB."""
    peaks = [peak for pid, _ in (_children_stats() or []) if (peak := _status_mb(pid, "VmHWM")) is not None]
    return max(peaks) if peaks else None


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def build_loader(case: Case, dataset: str, num_workers: int, packing_buffer_size: int | None):
    """The trainer's `VLMData` for a case (rank 0 of 1, one micro-batch per step)."""
    from titanmm.config import load_config
    from titanmm.data.tokenizer import build_tokenizer
    from titanmm.data.vlm_data import VLMData
    from titanmm.models import get_model_spec

    image, tokens_per_tile = image_setup(case.tiling)
    args = get_model_spec("vlm").flavors["llava_mistral_7b_clip336"]
    args = dataclasses.replace(args, image=image, image_token_id=IMAGE_TOKEN_ID)
    overrides = ["--model.flavor=llava_mistral_7b_clip336", f"--training.dataset={dataset}",
                 f"--training.seq_len={case.seq_len}",
                 f"--training.local_batch_size={case.batch_size}", "--multimodal.chat_template=plain",
                 f"--multimodal.task={case.task}", f"--multimodal.num_workers={num_workers}",
                 f"--multimodal.packing={str(case.packing).lower()}"]
    if packing_buffer_size is not None:
        overrides.append(f"--multimodal.packing_buffer_size={packing_buffer_size}")
    config = load_config(str(REPO / "train_configs" / "debug_vlm.toml"), overrides)
    return VLMData(config, args, tokens_per_tile, build_tokenizer(""), 0, 1, 1), config


def measure(case: Case, dataset: str, num_workers: int, warmup_s: float, seconds: float,
            packing_buffer_size: int | None = None) -> dict:
    """Samples/s of one case with `num_workers` loader processes (see the module docstring)."""
    data, config = build_loader(case, dataset, num_workers, packing_buffer_size)
    main_rss_mb = _status_mb(os.getpid(), "VmRSS")
    started = time.perf_counter()
    step = 0

    def next_batch():
        nonlocal step
        (mb,) = data.microbatches(step)
        step += 1
        return len(data.last_sample_keys[0]), mb

    try:
        next_batch()
        first_batch_s = time.perf_counter() - started
        first_cpu = children_cpu_seconds() if num_workers > 0 else None
        while time.perf_counter() - started < first_batch_s + warmup_s:
            next_batch()
        data.pop_metrics()
        cpu0, main0, t0, load0 = children_cpu_seconds(), _own_cpu_seconds(), time.perf_counter(), os.getloadavg()[0]
        samples = tiles = batches = 0
        while time.perf_counter() - t0 < seconds:
            n, mb = next_batch()
            samples, tiles, batches = samples + n, tiles + int(mb["tiles_per_sample"].sum()), batches + 1
        elapsed = time.perf_counter() - t0
        cpu1, main1 = children_cpu_seconds(), _own_cpu_seconds()
        metrics = data.pop_metrics()
        tile_bytes = mb["pixel_values"][0].numel() * mb["pixel_values"].element_size()
        worker_peak_rss_mb = children_peak_rss_mb() if num_workers > 0 else None
    finally:
        data.close()
        gc.collect()  # shut the workers down now, not in a later loader's forked workers
    workers = max(num_workers, 1)
    rate = samples / elapsed
    cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None and num_workers > 0 else None
    per_cpu_s = samples / cpu if cpu else None
    return {
        "num_workers": num_workers,
        "packing_buffer_size": config.multimodal.packing_buffer_size if case.packing else None,
        "defer_pixels_when_packing": _defer_pixels() if case.packing else None,
        "samples": samples,
        "batches": batches,
        "seconds": round(elapsed, 2),
        "first_batch_s": round(first_batch_s, 2),
        "first_batch_worker_cpu_s": round(first_cpu, 2) if first_cpu is not None else None,
        "samples_per_s": round(rate, 2),
        "samples_per_s_per_worker": round(rate / workers, 2),
        "worker_cpu_s": round(cpu, 2) if cpu is not None else None,
        "samples_per_worker_cpu_s": round(per_cpu_s, 2) if per_cpu_s else None,
        "main_process_cpu_ms_per_sample": round(1000 * (main1 - main0) / samples, 2) if samples else None,
        "main_process_rss_mb": round(main_rss_mb) if main_rss_mb is not None else None,
        "worker_peak_rss_mb": round(worker_peak_rss_mb) if worker_peak_rss_mb is not None else None,
        "tiles_per_sample": round(tiles / samples, 2) if samples else None,
        "pixel_mb_per_sample": round(tiles / samples * tile_bytes / 2**20, 2) if samples else None,
        "packing_efficiency": round(metrics["packing_efficiency"], 4),
        "skipped_samples": metrics["skipped_samples"],
        "load_average_1min_before": round(load0, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
    }


def _defer_pixels() -> bool:
    from titanmm.data.energon import VLMTaskEncoder

    return VLMTaskEncoder.defer_pixels_when_packing


def workers_needed(runs: list[dict], demand: dict) -> dict:
    """Loader workers per GPU (tensor-parallel degree 1) for each demand, from the single-worker rates: by wall
    time on this machine, and by worker CPU time (a worker with a core of its own)."""
    single = next((r for r in runs if r["num_workers"] == 1), runs[0])
    out = {}
    for name, rate in demand.items():
        out[name] = {"samples_per_s": round(rate, 2),
                     "by_wall_rate": math.ceil(rate / single["samples_per_s_per_worker"]),
                     "by_cpu_rate": (math.ceil(rate / single["samples_per_worker_cpu_s"])
                                     if single["samples_per_worker_cpu_s"] else None)}
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=128, help="distinct JPEGs (and records per dataset)")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per case and worker count")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of batches dropped after the first one")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--packing-buffer-size", type=int, default=None, help="default: multimodal.packing_buffer_size")
    p.add_argument("--eager-packing", action="store_true", help="buffer fully encoded samples, pixels included (the "
                   "pipeline before pixels were made per pack), to compare memory and time to the first batch")
    p.add_argument("--workdir", default=None, help="where the data is made (default: a temp dir, deleted)")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--no-write", action="store_true", help="print the results only")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import logging
    import warnings

    titanmm_logger = logging.getLogger("titanmm")
    level = titanmm_logger.level
    titanmm_logger.setLevel(logging.ERROR)  # restored below: a test may run main() in its own process
    os.environ.setdefault("TQDM_DISABLE", "1")  # energon's packing-buffer progress bar, in every worker
    warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no accelerator")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="titanmm_vlm_loader_"))
    started = time.perf_counter()
    from titanmm.data.energon import VLMTaskEncoder

    defer = VLMTaskEncoder.defer_pixels_when_packing
    VLMTaskEncoder.defer_pixels_when_packing = not args.eager_packing  # before the loader workers fork
    try:
        made = time.perf_counter()
        data = write_datasets(root, args.images, {CASES[name].data for name in args.cases})
        data["build_s"] = round(time.perf_counter() - made, 1)
        results = {}
        for name in args.cases:
            case = CASES[name]
            runs = []
            for num_workers in args.workers:
                run = measure(case, data["paths"][case.data], num_workers, args.warmup, args.seconds,
                              args.packing_buffer_size)
                runs.append(run)
                print(f"{name:26s} workers {num_workers}: {run['samples_per_s']:7.2f} samples/s "
                      f"({run['samples_per_s_per_worker']:.2f}/worker, {run['samples_per_worker_cpu_s']} per worker "
                      f"CPU-second), first batch {run['first_batch_s']:.1f} s, {run['tiles_per_sample']} tiles/sample,"
                      f" worker peak RSS {run['worker_peak_rss_mb']} MB, load {run['load_average_1min_before']}",
                      flush=True)
            results[name] = {"case": dataclasses.asdict(case), "runs": runs,
                             "workers_needed_per_gpu": workers_needed(runs, case.demand)}
    finally:
        VLMTaskEncoder.defer_pixels_when_packing = defer
        titanmm_logger.setLevel(level)
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    date = datetime.date.today().isoformat()
    out = {
        "workload": "vlm_loader: samples/s of the VLMData energon loader (JPEG decode, CLIP-336 / InternViT-448 "
                    "tiling, tokenization, packing) over COCO-like 640x480 JPEGs, per loader worker",
        "device": cpu_description(),
        "date": date,
        "commit": commit(),
        "command": command_line("vlm_loader.py", argv),
        "demand_per_gpu": {"llava_stage1_h100": STAGE1_SAMPLES_PER_S,
                           "llava_sft_seq4096_h100": SFT_SAMPLES_PER_ROW * SFT_ROWS_PER_S},
        "data": {k: v for k, v in data.items() if k != "paths"},
        "runtime_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    if not args.no_write:
        write_results(out, Path(args.results_dir) / f"{date}_cpu_vlm_loader.json")
    return out


if __name__ == "__main__":
    main()
