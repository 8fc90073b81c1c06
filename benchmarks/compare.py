"""titanmm against a peer, side by side, in one invocation on the same GPUs.

    python benchmarks/compare.py --workload W [--gpus N] [--steps S] [--warmup W] [--results-dir D]
    python benchmarks/compare.py --workload W --dry-run        # print the exact commands of both sides

Workloads (identical model, sequence length, batch and precision on both sides; each side with its best settings):

* `llama3_8b_proxy_bf16` (1 GPU): Llama 3 8B widths with 8 layers, seq 8192, batch 1, bf16 with fp32 reduction,
  compile, per-op selective activation checkpointing. Peer: torchtitan 0.2.2's Llama 3, the same settings.
* `llama3_8b_proxy_fp8` (1 GPU): the same with the linears in FP8 tensorwise (torchao), the output layer in bf16.
  Peer: torchtitan's float8 converter, tensorwise.
* `llama3_8b_bf16` / `llama3_8b_fp8` (4 GPUs): the full Llama 3 8B under FSDP over `--gpus`; FP8 with the FP8 FSDP
  all-gather and precomputed scales on both sides.
* `llava_mistral_clip336_pretrain` (1 GPU): LLaVA stage 1, CLIP-L/336 + Mistral 7B with only the projector training,
  mock image-text samples, seq 1024 (576 image tokens), batch 8. Peer: transformers' LlavaForConditionalGeneration
  (`bench_hf.py llava 8`).
* `llava_mistral_clip336_sft` (4 GPUs): LLaVA stage 2, the projector and Mistral 7B training, CLIP-L/336 frozen, on
  a synthetic LLaVA-665K-like SFT set (`benchmarks/llava_sft_data.py`, built by the setup step into
  <tmp>/titanmm_llava_sft_data/, reused while its parameters match: JPEGs, LLaVA JSON, energon shards and the same
  samples tokenized by titanmm for the peer). titanmm: train_configs/llava_mistral_clip_sft.toml, FSDP over all GPUs,
  samples packed into rows of seq 4096 (`multimodal.packing`), 1 row per GPU and step, compile, no activation
  checkpointing, the shipped tokenizer with the "plain" template. Peer: `benchmarks/hf_llava_sft.py`, transformers'
  LlavaForConditionalGeneration (SDPA) under FSDP2 (bf16 compute, fp32 parameters and reduction), 2 samples per GPU
  and step padded to the longest, no packing, no activation checkpointing, the same samples (file order). The
  ratio is of samples/s/GPU.
* `decode_llama3_8b` (1 GPU): greedy decoding with a random-weight Llama 3 8B in bf16, 128-token prompts, 128 new
  tokens, batch 1 and 32: `titanmm.generate` vs transformers' generate with its default cache
  (`bench_hf.py decode default B`). Its static cache + compile (reduce-overhead) variant fails on this software
  (torch 2.11, transformers 5.17: "accessing tensor output of CUDAGraphs that has been overwritten", measured in
  ../shared/peers/README.md), so the default cache is the peer's best working setting.
* `decode_llava_mistral_clip336` (1 GPU): the same with a random-weight LLaVA (CLIP-L/336 + Mistral 7B) in bf16,
  one image per prompt: bos + 576 image tokens + 128 text tokens, 128 new tokens, batch 1 and 32:
  `titanmm.generate` with pixel values (`decode_throughput.py --model vlm`) vs transformers'
  LlavaForConditionalGeneration.generate with its default cache (`benchmarks/hf_llava_decode.py --batch B`,
  bench_hf.py's LLaVA dimensions). The projectors differ (titanmm's flavor: Megatron's 1024->14336->4096; transformers':
  1024->4096->4096) but run in the prefill only, as the vision tower does.

The peers run from `.peers/` (a git-ignored copy of ../shared/peers that `benchmarks/setup_peers.sh` makes, with the
torchtitan wheels in `.device-wheels/`); titanmm runs from this checkout. Each side is its own process, one after
the other, on the same GPUs.

Measurement. Training: every `--log-freq` steps (default every step) both sides log the window since their last log
(titanmm's metrics.jsonl, torchtitan's "step: ... tps ... tflops ... mfu" lines); a log reads the loss from the GPU,
so with 1 each step waits for the GPU once. Windows that start within the first `--warmup` steps are dropped and the
median of the rest is reported: tokens/s/GPU, TFLOP/s/GPU and
MFU (both count 6 x non-embedding parameters + 12 x layers x heads x head_dim x seq FLOPs per token, against the bf16
dense peak, also for FP8), and the largest peak reserved memory of the measured steps. transformers' LLaVA step is
timed by its script (mean of 10 steps after 3); its TFLOP/s use titanmm's FLOPs per token of the same model, and
memory there is the peak *allocated* on both sides (the script reports no reserved memory). Decoding: new tokens/s
per generate call (prefill included; titanmm: median of 3 calls after 2, transformers: mean of 3 after 2); TFLOP/s
count 2 x non-embedding parameters per new token (for LLaVA the language model's: the vision tower and projector
run in the prefill only). For batch 1 the result also gives the fraction of the
memory-bandwidth bound: every decode step reads each weight (but the input embedding) once, so the bound is
HBM bandwidth / weight bytes tokens/s (for LLaVA its language model's weights), with the bandwidth measured by a
device-to-device copy in the same run.

LLaVA SFT (`llava_mistral_clip336_sft`): samples/s/GPU is the headline (a packed row holds ~5 samples, a padded
batch row one). titanmm's metrics.jsonl windows carry `samples` (the window's samples over all data-parallel ranks,
`VLMData.pop_metrics`); a window lasts from the previous record's `time` to its own, and samples/s/GPU = the
measured windows' samples / their seconds / GPUs; tokens/s/GPU counts non-pad tokens (tps_per_gpu x
packing_efficiency; the padded rate is `padded_tps_per_gpu`). The peer times its steps after the warm-up as one
window and reports samples/s/GPU, non-pad and padded tokens/s/GPU and the peak allocated / reserved memory (largest
over its ranks). TFLOP/s and MFU on both sides: non-pad tokens/s x titanmm's LM FLOPs per token at the side's mean
sample length (6N + attention over one sample, as titanmm counts it; vision tower not counted). Memory: peak
reserved on both sides (`peak_allocated_gib` beside it).

Writes `<results-dir>/<date>_<device>_<workload>.json` (`workload`, `device`, `gpus`, `commit`, `command`, a
`titanmm` and a `peer` object with `tps_per_gpu`, `tflops_per_gpu`, `mfu`, `peak_mem_gib`, and `ratio` =
titanmm / peer tokens/s, for LLaVA SFT samples/s/GPU, named in `ratio_of`), appends both sides' full output to
`--log` and prints a table. Each file also gets `targets` (issue 7's targets for the workload: required, measured,
met, shortfall) and `profiles` (the workload's kernel breakdowns beside it), from `benchmarks/targets.py`.
`benchmarks/readme_table.py` turns the results files into the README's table.

For experiments: `--only titanmm|peer` runs one side (the results file gets an `_<side>_only` suffix),
`--titanmm-arg=ARG` appends ARG to titanmm's command, `--time-limit S` ends whatever still runs after S seconds
(benchmarks/device_compare.sh uses it to keep one device call within its budget).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import targets  # noqa: E402
from hf_llava_sft import RESULT_PREFIX as HF_SFT_RESULT  # noqa: E402
from targets import device_slug  # noqa: E402
from results_io import commit, last_json_line  # noqa: E402

PEERS = Path(".peers")  # relative to the repository root, where every process runs
TORCHTITAN = "torchtitan 0.2.2"
TRANSFORMERS = "transformers"
ALLOC_CONF = {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}  # both sides (titanmm.train sets it itself too)


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # "lm" (training, torchtitan peer), "vlm" / "vlm_sft" (training, transformers peer) or "decode"
    gpus: int
    peer: str
    layers: int = 32
    fp8: bool = False
    seq_len: int = 8192
    batch: int = 1  # vlm_sft: titanmm's packed rows per GPU and step
    decode_batches: tuple[int, ...] = ()
    peer_batch: int = 0  # vlm_sft: the peer's samples per GPU and step (padded to the longest)
    samples: int = 0  # vlm_sft: samples of the synthetic dataset
    decode_model: str = "llama"  # decode: "llama" (DECODE_FLAVOR) or "vlm" (VLM_FLAVOR, one image per prompt)


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("llama3_8b_proxy_bf16", "lm", 1, TORCHTITAN, layers=8),
    Workload("llama3_8b_proxy_fp8", "lm", 1, TORCHTITAN, layers=8, fp8=True),
    Workload("llama3_8b_bf16", "lm", 4, TORCHTITAN),
    Workload("llama3_8b_fp8", "lm", 4, TORCHTITAN, fp8=True),
    Workload("llava_mistral_clip336_pretrain", "vlm", 1, TRANSFORMERS, seq_len=1024, batch=8),
    Workload("llava_mistral_clip336_sft", "vlm_sft", 4, TRANSFORMERS, seq_len=4096, batch=1, peer_batch=2,
             samples=2000),
    Workload("decode_llama3_8b", "decode", 1, TRANSFORMERS, seq_len=128, decode_batches=(1, 32)),
    Workload("decode_llava_mistral_clip336", "decode", 1, TRANSFORMERS, seq_len=128, decode_batches=(1, 32),
             decode_model="vlm"),
]}
VLM_FLAVOR = "llava_mistral_7b_clip336"
LLAMA3_VOCAB = 128256  # torchtitan takes its vocabulary size from the tokenizer: benchmarks/torchtitan_assets.py
DECODE_FLAVOR, DECODE_NEW_TOKENS, DECODE_WARMUP, DECODE_ITERS = "llama3_8b", 128, 2, 3
SFT_DATA_ROOT = Path(tempfile.gettempdir()) / "titanmm_llava_sft_data"  # kept between runs (llava_sft_data.py)


@dataclass
class Run:
    """One process of the comparison: a setup step, titanmm's side or the peer's."""

    side: str  # "setup", "titanmm" or "peer"
    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    output: Path | None = None  # a file the run writes its results to (titanmm's metrics.jsonl, decode JSON)
    batch: int | None = None  # decode: the batch of this peer run
    needed_by: tuple[str, ...] = ("peer",)  # setup: the sides that need it (skipped with them, failing them)

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(self.argv)


# ---------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------

def _torchrun(gpus: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *extra]


def sft_data_dir(w: Workload) -> Path:
    """Where the setup step builds (or finds) the synthetic SFT dataset of a vlm_sft workload."""
    return SFT_DATA_ROOT / f"n{w.samples}_seq{w.seq_len}_seed0"


def titanmm_train_argv(w: Workload, gpus: int, steps: int, dump: Path, log_freq: int = 1) -> list[str]:
    logging = [f"--job.dump_folder={dump}", f"--metrics.log_freq={log_freq}", "--checkpoint.enable=false",
               "--metrics.plot_loss=false", "--metrics.enable_tensorboard=false", f"--training.steps={steps}"]
    if w.kind == "lm":
        args = ["--config", "train_configs/llama3_8b.toml", "--training.dataset=mock",
                f"--training.seq_len={w.seq_len}", f"--training.local_batch_size={w.batch}",
                "--training.global_batch_size=-1", "--compile.enable=true", "--activation_checkpoint.mode=selective",
                # titanmm's best: every matmul output kept (the config's default; torchtitan's "op" recomputes
                # every other one). Equal settings: --titanmm-arg=--activation_checkpoint.selective_ac_option=op
                "--activation_checkpoint.selective_ac_option=op_all_matmuls",
                # AdamW generated by torch.compile (the config's default; torchtitan steps torch's fused AdamW)
                "--optimizer.implementation=compiled"]
        if w.layers != 32:
            args.append(f"--model.n_layers={w.layers}")
        if w.fp8:  # tensorwise; FP8 FSDP all-gather and precomputed scales stay on (the [float8] defaults)
            args += ["--float8.enable=true", "--float8.recipe=tensorwise"]
    elif w.kind == "vlm":  # the LLaVA stage-1 recipe on mock samples, one GPU, no tensor parallelism
        args = ["--config", "train_configs/llava_mistral_clip_pretrain.toml", f"--model.flavor={VLM_FLAVOR}",
                "--model.tokenizer_path=", "--training.dataset=mock", f"--training.seq_len={w.seq_len}",
                f"--training.local_batch_size={w.batch}", "--training.global_batch_size=-1",
                "--parallelism.tensor_parallel_degree=1", "--checkpoint.initial_load_path=",
                "--compile.enable=true", "--activation_checkpoint.mode=none"]
    elif w.kind == "vlm_sft":  # the LLaVA stage-2 recipe on the synthetic set, packed, FSDP over all GPUs
        args = ["--config", "train_configs/llava_mistral_clip_sft.toml", f"--model.flavor={VLM_FLAVOR}",
                "--model.tokenizer_path=", f"--training.dataset={sft_data_dir(w) / 'energon'}",
                f"--training.seq_len={w.seq_len}", f"--training.local_batch_size={w.batch}",
                "--training.global_batch_size=-1", "--multimodal.chat_template=plain", "--multimodal.packing=true",
                "--parallelism.tensor_parallel_degree=1", "--checkpoint.initial_load_path=",
                "--compile.enable=true", "--activation_checkpoint.mode=none"]
    else:
        raise ValueError(w.kind)
    return _torchrun(gpus) + ["-m", "titanmm.train", *args, *logging]


def torchtitan_argv(w: Workload, gpus: int, steps: int, dump: Path, assets: Path, log_freq: int = 1) -> list[str]:
    args = [str(PEERS / "torchtitan" / "launch.py"), "--job.config_file", str(PEERS / "torchtitan" / "bench.toml"),
            "--job.dump_folder", str(dump), "--model.hf_assets_path", str(assets / "assets"),
            "--training.dataset_path", str(assets / "data"), "--training.steps", str(steps),
            "--training.seq_len", str(w.seq_len), "--training.local_batch_size", str(w.batch),
            "--metrics.log_freq", str(log_freq), "--metrics.disable_color_printing"]
    if w.fp8:  # torchtitan's recommended tensorwise setup (no recipe_name: that form refuses the FP8 all-gather)
        args += ["--model.converters", "quantize.linear.float8", "--quantize.linear.float8.filter_fqns", "output",
                 "--quantize.linear.float8.enable_fsdp_float8_all_gather",
                 "--quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp"]
    # Rank 0's output only, each line prefixed "[rank0]:" (torchtitan's own launcher does the same).
    return _torchrun(gpus, "--local-ranks-filter", "0", "--role", "rank", "--tee", "3") + args


def plan(w: Workload, gpus: int, steps: int, work: Path, titanmm_args: list[str] = (),
         peer_args: list[str] = (), log_freq: int = 1, warmup: int = 5,
         side_env: dict[str, dict[str, str]] | None = None) -> list[Run]:
    """The processes of one comparison, in order. `titanmm_args` / `peer_args` are appended to the commands of
    titanmm / the peer (training peers only), `side_env[side]` added to that side's environment; both training
    sides log every `log_freq` steps (the LLaVA SFT peer times its steps after `warmup` as one window)."""
    runs = _plan(w, gpus, steps, work, log_freq, warmup)
    for run in runs:
        if run.side == "titanmm":
            run.argv += list(titanmm_args)
        elif run.side == "peer":
            run.argv += list(peer_args)
        run.env.update((side_env or {}).get(run.side, {}))
    return runs


def _plan(w: Workload, gpus: int, steps: int, work: Path, log_freq: int = 1, warmup: int = 5) -> list[Run]:
    if w.kind == "lm":
        assets = work / "torchtitan_assets"
        return [
            Run("setup", "torchtitan assets", [sys.executable, "benchmarks/torchtitan_assets.py", str(assets),
                                               f"--vocab-size={LLAMA3_VOCAB}"]),
            Run("titanmm", "titanmm", titanmm_train_argv(w, gpus, steps, work / "titanmm", log_freq), dict(ALLOC_CONF),
                output=work / "titanmm" / "metrics.jsonl"),
            Run("peer", TORCHTITAN, torchtitan_argv(w, gpus, steps, work / "torchtitan", assets, log_freq),
                {"TT_LAYERS": str(w.layers), **ALLOC_CONF}),
        ]
    if w.kind == "vlm":
        return [
            Run("titanmm", "titanmm", titanmm_train_argv(w, gpus, steps, work / "titanmm", log_freq), dict(ALLOC_CONF),
                output=work / "titanmm" / "metrics.jsonl"),
            Run("peer", TRANSFORMERS, [sys.executable, str(PEERS / "transformers" / "bench_hf.py"), "llava",
                                       str(w.batch)], dict(ALLOC_CONF)),
        ]
    if w.kind == "vlm_sft":
        data = sft_data_dir(w)
        return [
            Run("setup", "LLaVA SFT data", [sys.executable, "benchmarks/llava_sft_data.py", str(data),
                                            f"--samples={w.samples}", f"--seq-len={w.seq_len}"],
                needed_by=("titanmm", "peer")),
            Run("titanmm", "titanmm", titanmm_train_argv(w, gpus, steps, work / "titanmm", log_freq), dict(ALLOC_CONF),
                output=work / "titanmm" / "metrics.jsonl"),
            Run("peer", TRANSFORMERS, _torchrun(gpus) + [
                "benchmarks/hf_llava_sft.py", "--data", str(data), f"--batch={w.peer_batch}", f"--steps={steps}",
                f"--warmup={warmup}"], dict(ALLOC_CONF)),
        ]
    vlm = w.decode_model == "vlm"
    runs = [Run("titanmm", "titanmm", [
        sys.executable, "benchmarks/decode_throughput.py", *(["--model", "vlm"] if vlm else []),
        "--flavor", decode_flavor(w),
        "--batch", *map(str, w.decode_batches), "--prompt-len", str(w.seq_len), "--new-tokens", str(DECODE_NEW_TOKENS),
        "--warmup", str(DECODE_WARMUP), "--iters", str(DECODE_ITERS), "--compile", "--json", str(work / "decode.json")],
        dict(ALLOC_CONF), output=work / "decode.json")]
    for batch in w.decode_batches:
        if vlm:  # the LLaVA decode peer is in benchmarks/ (bench_hf.py's decode is Llama only)
            argv = [sys.executable, "benchmarks/hf_llava_decode.py", "--batch", str(batch), "--mode", "default",
                    "--prompt-len", str(w.seq_len), "--new-tokens", str(DECODE_NEW_TOKENS),
                    "--warmup", str(DECODE_WARMUP), "--iters", str(DECODE_ITERS)]
        else:
            argv = [sys.executable, str(PEERS / "transformers" / "bench_hf.py"), "decode", "default", str(batch)]
        runs.append(Run("peer", f"{TRANSFORMERS} B={batch}", argv, dict(ALLOC_CONF), batch=batch))
    return runs


# ---------------------------------------------------------------------------------------------------------------
# Parsing the sides' output
# ---------------------------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RANK = re.compile(r"^\[(?:rank|default)(\d+)\]:")
_NUMBER = r"(-?[\d,]*\.?\d+(?:[eE][-+]?\d+)?|nan|inf)"


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse_torchtitan_log(text: str) -> list[dict]:
    """Training records from torchtitan's metric lines, e.g. (colours and a "[rank0]:" prefix optional)

        [rank0]:[titan] 2026-11-22 13:00:00,123 - root - INFO - step: 10  loss:  9.12345  grad_norm:  1.2345
        memory: 43.70GiB(54.93%)  tps: 29,375  tflops: 495.12  mfu: 50.06%

    (one line). Validation lines are skipped; when several ranks print, rank 0's lines are kept; a step printed twice
    keeps its first line. Returns [{"step", "loss", "tps_per_gpu", "tflops_per_gpu", "mfu" (a fraction),
    "peak_mem_gib"}] in step order.
    """
    fields = {"loss": rf"loss:\s*{_NUMBER}", "peak_mem_gib": rf"memory:\s*{_NUMBER}\s*GiB",
              "tps_per_gpu": rf"tps:\s*{_NUMBER}", "tflops_per_gpu": rf"tflops:\s*{_NUMBER}",
              "mfu": rf"mfu:\s*{_NUMBER}\s*%"}
    by_rank: dict[int, dict[int, dict]] = {}
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).strip()
        rank_match = _RANK.match(line)
        rank = int(rank_match.group(1)) if rank_match else 0
        step = re.search(r"\bstep:\s*(\d+)", line)
        if "validat" in line.lower() or step is None or "tps:" not in line:
            continue
        record: dict = {"step": int(step.group(1))}
        for key, pattern in fields.items():
            match = re.search(pattern, line)
            record[key] = _number(match.group(1)) if match else None
        if record["mfu"] is not None:
            record["mfu"] /= 100.0
        by_rank.setdefault(rank, {}).setdefault(record["step"], record)
    if not by_rank:
        return []
    records = by_rank.get(0) or by_rank[min(by_rank)]
    return [records[s] for s in sorted(records)]


def parse_titanmm_jsonl(text: str) -> list[dict]:
    """titanmm's metrics.jsonl records (rank 0), in step order; a truncated line is skipped."""
    records = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records[record["step"]] = record
    return [records[s] for s in sorted(records)]


_HF_LLAVA = re.compile(r"HF LLaVA.*?B=(\d+)\s+S=(\d+):\s*([\d.,]+)\s*ms/step,\s*([\d.,]+)\s*samples/s,\s*"
                       r"([\d.,]+)\s*tok/s,\s*peak\s*([\d.,]+)\s*GiB")
_HF_DECODE = re.compile(r"HF generate\s+(\S+)\s+(\w+)\s+B=(\d+):\s*([\d.,]+)\s*new tok/s\s*\(([\d.,]+)\s*s per call"
                        r"(?: of (\d+) tokens)?\)?(?:,\s*peak\s*([\d.,]+)\s*GiB)?")


def parse_hf_llava(text: str) -> dict | None:
    """`bench_hf.py llava B` -> {"batch", "seq_len", "ms_per_step", "samples_per_s", "tps_per_gpu",
    "peak_mem_gib"} (the last result line), or None."""
    matches = list(_HF_LLAVA.finditer(_ANSI.sub("", text)))
    if not matches:
        return None
    b, s, ms, samples, tps, mem = matches[-1].groups()
    return {"batch": int(b), "seq_len": int(s), "ms_per_step": _number(ms), "samples_per_s": _number(samples),
            "tps_per_gpu": _number(tps), "peak_mem_gib": _number(mem)}


def parse_hf_decode(text: str) -> dict | None:
    """`bench_hf.py decode MODE B` or `hf_llava_decode.py --batch B` -> {"model", "mode", "batch",
    "new_tokens_per_s", "seconds_per_call", "new_tokens"} and, when the line ends in ", peak X GiB"
    (hf_llava_decode.py on CUDA), "peak_mem_gib" (the last result line), or None."""
    matches = list(_HF_DECODE.finditer(_ANSI.sub("", text)))
    if not matches:
        return None
    model, mode, b, rate, seconds, new, peak = matches[-1].groups()
    parsed = {"model": model, "mode": mode, "batch": int(b), "new_tokens_per_s": _number(rate),
              "seconds_per_call": _number(seconds), "new_tokens": int(new) if new else None}
    if peak is not None:
        parsed["peak_mem_gib"] = _number(peak)
    return parsed


def summarize_steps(records: list[dict], warmup: int, memory_key: str = "peak_mem_gib", log_freq: int = 1) -> dict:
    """Median tokens/s/GPU, TFLOP/s/GPU and MFU of the logged windows of `log_freq` steps that all come after
    `warmup`, and the largest `memory_key` (reported as peak_mem_gib) and data_wait_pct (titanmm's) of those."""
    measured = [r for r in records if r["step"] - log_freq >= warmup]
    if not measured:
        raise ValueError(f"{len(records)} logged steps, none after the {warmup} warm-up steps")

    def median(key):
        values = [r[key] for r in measured if r.get(key) is not None]
        return statistics.median(values) if values else None

    memory = [r[memory_key] for r in measured if r.get(memory_key) is not None]
    waits = [r["data_wait_pct"] for r in measured if r.get("data_wait_pct") is not None]  # titanmm's records
    summary = {"tps_per_gpu": median("tps_per_gpu"), "tflops_per_gpu": median("tflops_per_gpu"), "mfu": median("mfu"),
               "peak_mem_gib": max(memory) if memory else None, "measured_steps": len(measured),
               "steps": [measured[0]["step"], measured[-1]["step"]]}
    if waits:
        summary["data_wait_pct"] = max(waits)
    return summary


def summarize_sft_windows(records: list[dict], warmup: int, gpus: int, log_freq: int = 1) -> dict:
    """titanmm's LLaVA SFT throughput from its metrics.jsonl records (rank 0; each with the window's `samples` over
    all data-parallel ranks, `tps_per_gpu` = padded tokens/s/GPU, `packing_efficiency` and wall-clock `time`).

    A window runs from the previous record's `time` to its own; those that start at or after the `warmup`-th step
    count (as in `summarize_steps`). Returns samples_per_s_per_gpu (their samples / their seconds / `gpus`),
    tps_per_gpu (non-pad tokens/s/GPU: tps_per_gpu x packing_efficiency, time-weighted), padded_tps_per_gpu,
    packing_efficiency, ms_per_step, samples_per_step (over all GPUs), the largest peak_mem_gib (reserved),
    peak_allocated_gib and data_wait_pct (the trainer's host time waiting for batches) of those windows,
    measured_steps and the first and last measured step."""
    windows = [(prev, cur) for prev, cur in zip(records, records[1:]) if cur["step"] - log_freq >= warmup]
    if not windows:
        raise ValueError(f"{len(records)} logged steps, no window after the {warmup} warm-up steps")
    if any(cur.get("samples") is None for _, cur in windows):
        raise ValueError("titanmm's metrics.jsonl records carry no 'samples' (VLMData.pop_metrics)")
    seconds = [cur["time"] - prev["time"] for prev, cur in windows]
    if min(seconds) <= 0:
        raise ValueError(f"window lengths {seconds}: the records' times do not increase")
    total = sum(seconds)
    steps = sum(cur["step"] - prev["step"] for prev, cur in windows)
    samples = sum(cur["samples"] for _, cur in windows)
    padded = sum(cur["tps_per_gpu"] * s for (_, cur), s in zip(windows, seconds))
    real = sum(cur["tps_per_gpu"] * cur["packing_efficiency"] * s for (_, cur), s in zip(windows, seconds))

    def largest(key):
        values = [cur[key] for _, cur in windows if cur.get(key) is not None]
        return max(values) if values else None

    return {"samples_per_s_per_gpu": samples / total / gpus, "tps_per_gpu": real / total,
            "padded_tps_per_gpu": padded / total, "packing_efficiency": real / padded if padded else None,
            "ms_per_step": 1000 * total / steps, "samples_per_step": samples / steps,
            "peak_mem_gib": largest("peak_mem_gib"), "peak_allocated_gib": largest("peak_allocated_gib"),
            "data_wait_pct": largest("data_wait_pct"), "measured_steps": steps,
            "steps": [windows[0][1]["step"], windows[-1][1]["step"]]}


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------

def _peak(device: str) -> float | None:
    from titanmm.utils.device import peak_flops

    return peak_flops(device, "bf16")


def _with_flops(side: dict, flops_per_token: float, peak: float | None) -> dict:
    """Fill tflops_per_gpu / mfu from tps_per_gpu and a FLOPs-per-token count."""
    tps = side.get("tps_per_gpu")
    if tps is not None:
        side["tflops_per_gpu"] = flops_per_token * tps / 1e12
        side["mfu"] = flops_per_token * tps / peak if peak else None
    return side


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def vlm_flops_per_token(seq_len: int) -> float:
    """titanmm's model FLOPs per token of the LLaVA workload: its language model's training count (6N +
    attention), as titanmm logs it (the frozen parts' missing weight gradients and the vision tower not counted)."""
    from titanmm.models.vlm.flavors import VLM_FLAVORS

    return VLM_FLAVORS[VLM_FLAVOR].lm.training_flops_per_token(seq_len)


# bf16 dense matmul rates measured on the lent GPUs (an 8192^3 product): ../shared/peers/README.md (H100) and the
# device notes (H200). The ceiling of a workload whose FLOPs are all matmul-shaped.
MEASURED_MATMUL_FLOPS = (("h100", 777e12), ("h200", 790e12))


def measured_matmul_flops(device: str) -> float | None:
    return next((rate for needle, rate in MEASURED_MATMUL_FLOPS if needle in device.lower()), None)


def llava_stage1_flops_per_sample(seq_len: int) -> float:
    """FLOPs one LLaVA stage-1 sample needs (the projector trained, the vision tower and the language model frozen):
    the vision tower's forward through the blocks in use, the projector's forward and backward, and the language
    model's forward and input-gradient backward: 4 x its parameters per token (no weight gradients) plus the whole
    attention term (12 x layers x heads x head_dim x seq, whose backward the input gradients need)."""
    from titanmm.models.vision.common import resolve_layer
    from titanmm.models.vlm.flavors import VLM_FLAVORS

    flavor = VLM_FLAVORS[VLM_FLAVOR]
    vision, projector, lm = flavor.vision, flavor.projector, flavor.lm
    patches = (vision.image_size // vision.patch_size) ** 2
    tokens, width = patches + 1, vision.hidden_size  # with the class token
    per_block = 2 * (4 * width * width + 2 * width * vision.intermediate_size) * tokens + 4 * tokens * tokens * width
    vision_flops = resolve_layer(vision.select_layer, vision.num_layers) * per_block
    projector_flops = 6 * (projector.vision_dim * projector.hidden_dim + projector.hidden_dim * projector.output_dim) \
        * patches
    lm_per_token = 4 * lm.num_params(include_embedding=False) + 12 * lm.n_layers * lm.n_heads * lm.head_dim * seq_len
    return vision_flops + projector_flops + lm_per_token * seq_len


def summarize_hf_llava(w: Workload, text: str, device: str) -> dict:
    hf = parse_hf_llava(text)
    if hf is None:
        raise ValueError("no 'HF LLaVA ...' result line in the transformers output")
    return _with_flops({"tps_per_gpu": hf["tps_per_gpu"], "samples_per_s": hf["samples_per_s"],
                        "ms_per_step": hf["ms_per_step"], "peak_mem_gib": hf["peak_mem_gib"]},
                       vlm_flops_per_token(w.seq_len), _peak(device))


def summarize_hf_llava_sft(text: str) -> dict:
    """The LLaVA SFT peer's side: samples/s/GPU, non-pad (tps_per_gpu) and padded tokens/s/GPU, ms/step, peak
    reserved (peak_mem_gib) and allocated memory, from its result line."""
    hf = last_json_line(_ANSI.sub("", text), HF_SFT_RESULT)
    if hf is None:
        raise ValueError(f"no '{HF_SFT_RESULT} ...' line in the transformers output")
    return {"samples_per_s_per_gpu": hf["samples_per_s_per_gpu"], "tps_per_gpu": hf["tokens_per_s_per_gpu"],
            "padded_tps_per_gpu": hf["padded_tokens_per_s_per_gpu"], "padding_efficiency": hf["padding_efficiency"],
            "ms_per_step": hf["ms_per_step"], "samples_per_step": hf["samples"] / hf["timed_steps"],
            "peak_mem_gib": hf["peak_reserved_gib"], "peak_allocated_gib": hf["peak_allocated_gib"],
            "measured_steps": hf["timed_steps"], "batch": hf["batch"], "grad_ckpt": hf["grad_ckpt"],
            "params": hf["params"], "loss": hf["loss"]}


def with_sft_flops(side: dict, peak: float | None) -> dict:
    """TFLOP/s and MFU of a LLaVA SFT side: non-pad tokens/s x titanmm's LM FLOPs per token at the side's mean
    sample length (tokens / samples)."""
    if side.get("tps_per_gpu") and side.get("samples_per_s_per_gpu"):
        side["mean_sample_tokens"] = side["tps_per_gpu"] / side["samples_per_s_per_gpu"]
        _with_flops(side, vlm_flops_per_token(max(1, round(side["mean_sample_tokens"]))), peak)
    return side


def decode_flavor(w: Workload) -> str:
    """The titanmm flavor a decode workload runs: DECODE_FLAVOR (a "llama" flavor) or VLM_FLAVOR (a "vlm" one)."""
    return VLM_FLAVOR if w.decode_model == "vlm" else DECODE_FLAVOR


def decode_image_tokens(w: Workload) -> int:
    """Image placeholder tokens per prompt of a decode workload (one image of the flavor's tile size; 0 for Llama)."""
    if w.decode_model != "vlm":
        return 0
    from titanmm.models.vlm.flavors import VLM_FLAVORS

    args = VLM_FLAVORS[VLM_FLAVOR]  # CLIP-L/336: (336 / 14)^2 patches, the class token dropped, no pixel shuffle
    return (args.image.tile_size // args.vision.patch_size) ** 2


def decode_weight_stats(w: Workload | None = None) -> tuple[int, int]:
    """(non-embedding parameters, weight bytes read per decode step in bf16) of the decode model (of a VLM: its
    language model's; the vision tower and projector run in the prefill only). Default: decode_llama3_8b's."""
    if w is not None and w.decode_model == "vlm":
        from titanmm.models.vlm.flavors import VLM_FLAVORS

        lm_args = VLM_FLAVORS[VLM_FLAVOR].lm
    else:
        from titanmm.models.llama import LLAMA_FLAVORS

        lm_args = LLAMA_FLAVORS[DECODE_FLAVOR]
    params = lm_args.num_params(include_embedding=False)
    return params, 2 * params


def _decode_side(rates: dict[int, dict], bound: float | None, flops_per_token: float, peak: float | None) -> dict:
    """One side's decode summary: batch 1 (or the smallest batch) in the top-level fields, all batches in by_batch."""
    by_batch = {}
    for batch, r in sorted(rates.items()):
        entry = _with_flops({"tps_per_gpu": r["new_tokens_per_s"]}, flops_per_token, peak)
        entry["seconds_per_call"] = r.get("seconds_per_call")
        entry["peak_mem_gib"] = r.get("peak_mem_gib")
        if r.get("roofline_tokens_per_s"):  # titanmm's side: the call's roofline on this GPU (decode_throughput.py)
            entry["roofline_tokens_per_s"] = r["roofline_tokens_per_s"]
        if batch == 1 and bound:
            entry["bandwidth_bound_fraction"] = r["new_tokens_per_s"] / bound
        by_batch[str(batch)] = entry
    head = by_batch[str(min(rates))]
    return {"tps_per_gpu": head["tps_per_gpu"], "tflops_per_gpu": head["tflops_per_gpu"], "mfu": head["mfu"],
            "peak_mem_gib": max((e["peak_mem_gib"] for e in by_batch.values() if e["peak_mem_gib"] is not None),
                                default=None),
            "bandwidth_bound_fraction": head.get("bandwidth_bound_fraction"), "by_batch": by_batch}


def summarize_decode(w: Workload, outputs: dict[str, str], device: str) -> tuple[dict, dict, dict]:
    """(titanmm, peer, extra top-level fields: bandwidth, bound, per-batch ratios)."""
    params, weight_bytes = decode_weight_stats(w)
    peak = _peak(device)
    titanmm = peer = None
    bound = None
    if outputs.get("titanmm"):
        t = json.loads(outputs["titanmm"])
        params, weight_bytes = t.get("params_read", params), t.get("weight_bytes", weight_bytes)
        bandwidth = t["hbm_copy_bytes_per_s"]
        bound = bandwidth / weight_bytes
        titanmm = _decode_side({int(b): v for b, v in t["batches"].items()}, bound, 2 * params, peak)
    extra: dict = {"weight_bytes": weight_bytes, "flops_per_new_token": 2 * params}
    if bound is not None:
        extra.update({"hbm_copy_gb_per_s": bandwidth / 1e9, "bandwidth_bound_tokens_per_s": bound})
    rates = {}
    for batch in w.decode_batches:
        parsed = parse_hf_decode(outputs.get(f"peer:{batch}", ""))
        if parsed is not None:
            rates[batch] = parsed
    if rates:
        peer = _decode_side(rates, bound, 2 * params, peak)
    if titanmm and peer:
        extra["ratio_by_batch"] = {b: ratio(titanmm["by_batch"][b]["tps_per_gpu"], peer["by_batch"][b]["tps_per_gpu"])
                                   for b in titanmm["by_batch"] if b in peer["by_batch"]}
    return titanmm, peer, extra


def summarize(w: Workload, outputs: dict[str, str], warmup: int, device: str, errors: dict[str, str],
              log_freq: int = 1, gpus: int | None = None) -> tuple[dict[str, dict | None], dict]:
    """Both sides' results from their outputs ({"titanmm": ..., "peer": ...}; decode: "peer:<batch>"), and extra
    top-level fields. A side whose output cannot be read gets None and an entry in `errors`."""
    sides: dict[str, dict | None] = {"titanmm": None, "peer": None}
    if w.kind == "vlm_sft":
        readers = {"titanmm": lambda text: summarize_sft_windows(parse_titanmm_jsonl(text), warmup, gpus or w.gpus,
                                                                 log_freq),
                   "peer": summarize_hf_llava_sft}
        for side, read in readers.items():
            if side in outputs:
                try:
                    sides[side] = with_sft_flops(read(outputs[side]), _peak(device))
                except (ValueError, KeyError, TypeError) as e:
                    errors.setdefault(side, f"could not read the results: {e}")
        extra = {"ratio_of": "samples/s/GPU"}
        if sides["titanmm"] and sides["peer"]:
            t, p = sides["titanmm"], sides["peer"]
            extra["tokens_ratio"] = ratio(t["tps_per_gpu"], p["tps_per_gpu"])
            extra["memory_ratio"] = ratio(t["peak_mem_gib"], p["peak_mem_gib"])
        return sides, extra
    if w.kind == "decode":
        try:
            sides["titanmm"], sides["peer"], extra = summarize_decode(w, outputs, device)
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            errors.setdefault("titanmm", f"could not read the results: {e!r}")
            return sides, {}
        if sides["peer"] is None and any(k.startswith("peer") for k in outputs):
            errors.setdefault("peer", "no 'HF generate ...' result line in the transformers output")
        return sides, extra
    readers = {
        "titanmm": lambda text: summarize_steps(parse_titanmm_jsonl(text), warmup,
                                                "peak_mem_gib" if w.kind == "lm" else "peak_allocated_gib", log_freq),
        "peer": (lambda text: summarize_steps(parse_torchtitan_log(text), warmup, log_freq=log_freq))
        if w.kind == "lm"
        else (lambda text: summarize_hf_llava(w, text, device)),
    }
    for side, read in readers.items():
        if side not in outputs:
            continue
        try:
            sides[side] = read(outputs[side])
        except (ValueError, KeyError) as e:
            errors.setdefault(side, f"could not read the results: {e}")
    extra = {}
    if w.kind == "vlm":
        if sides["titanmm"] and sides["titanmm"]["tps_per_gpu"]:
            sides["titanmm"]["samples_per_s"] = sides["titanmm"]["tps_per_gpu"] / w.seq_len
        extra["stage1_flops_per_sample"] = llava_stage1_flops_per_sample(w.seq_len)
        if measured_matmul_flops(device):  # every FLOP at the measured matmul rate: no faster step exists
            extra["ceiling_samples_per_s"] = measured_matmul_flops(device) / extra["stage1_flops_per_sample"]
    return sides, extra


# ---------------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------------

def settings(w: Workload, steps: int, warmup: int, log_freq: int = 1) -> dict:
    """What both sides ran, for the results file."""
    if w.kind == "decode":
        common = {"new_tokens": DECODE_NEW_TOKENS, "batches": list(w.decode_batches), "warmup_calls": DECODE_WARMUP,
                  "timed_calls": DECODE_ITERS}
        if w.decode_model == "vlm":
            images = decode_image_tokens(w)
            return {"model": VLM_FLAVOR, "peer_model": "transformers LlavaForConditionalGeneration (bench_hf.py's "
                                                       "LLaVA dimensions, SDPA)",
                    "precision": "bf16", "greedy": True, "prompt_len": 1 + images + w.seq_len,
                    "prompt": f"bos + {images} image tokens (one CLIP-L/336 image) + {w.seq_len} random text tokens",
                    "images_per_prompt": 1, "image_tokens": images, "text_tokens": w.seq_len,
                    "peer_cache": "default", **common}
        return {"model": DECODE_FLAVOR, "precision": "bf16", "greedy": True, "prompt_len": w.seq_len, **common}
    if w.kind == "vlm_sft":
        both = {"precision": "bf16 compute, fp32 parameters and gradient reduction (FSDP2)",
                "activation_checkpointing": "none"}
        return {"model": f"{VLM_FLAVOR} (vision tower frozen; projector and language model trained)",
                "seq_len": w.seq_len,
                "titanmm": {"rows_per_gpu": w.batch, "packing": True, "compile": True, **both},
                "peer": {"samples_per_gpu": w.peer_batch, "padding": "to the longest sample of the batch",
                         "compile": False, **both},
                "dataset": {"samples": w.samples, "path": str(sft_data_dir(w)),
                            "generator": "benchmarks/llava_sft_data.py"},
                "steps": steps, "warmup_steps": warmup, "log_freq": log_freq}
    model = {"lm": f"llama3_8b ({w.layers} layers)", "vlm": VLM_FLAVOR}[w.kind]
    return {"model": model, "seq_len": w.seq_len, "batch_per_gpu": w.batch,
            "precision": "fp8 tensorwise" if w.fp8 else "bf16", "steps": steps, "warmup_steps": warmup,
            "log_freq": log_freq}


def device_name() -> str:
    """The GPU's name as torch reports it, from a child process (this one keeps no CUDA context on the GPUs)."""
    code = "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
    try:
        return subprocess.check_output([sys.executable, "-c", code], text=True, timeout=120).strip().splitlines()[-1]
    except (subprocess.SubprocessError, OSError, IndexError):
        return "unknown"


def execute(run: Run, log, deadline: float | None) -> tuple[int, str, float]:
    """Run one process (its own session, so that a timeout ends torchrun's workers too); returns (exit status,
    output, seconds). Its output goes to `log` under a header."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", **run.env}
    timeout = None if deadline is None else max(deadline - time.monotonic(), 1.0)
    start = time.monotonic()
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out:
        proc = subprocess.Popen(run.argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            status = 124
        out.seek(0)
        text = out.read()
    seconds = time.monotonic() - start
    if log is not None:
        log.write(f"\n===== {run.label}: {run.shell()}\n{text}\n===== {run.label}: exit {status} after "
                  f"{seconds:.0f} s\n")
        log.flush()
    return status, text, seconds


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else format(value, spec) + suffix


def table(result: dict) -> str:
    """The printed comparison: one row per side (per side and batch for decoding)."""
    head = ["", "tokens/s/GPU", "TFLOP/s/GPU", "MFU", "peak mem GiB", "titanmm/peer"]
    rows = []
    kind = WORKLOADS[result["workload"]].kind if result["workload"] in WORKLOADS else "lm"
    for side in ("titanmm", "peer"):
        s = result.get(side) or {}
        name = "titanmm" if side == "titanmm" else result.get("peer_name", "peer")
        entries = [(name, s)] if kind != "decode" else [(f"{name} B={b}", e) for b, e in s.get("by_batch", {}).items()]
        if not entries:
            entries = [(name, {})]
        for label, e in entries:
            extra = ""
            if "samples_per_s" in e:
                extra = f"{_fmt(e['samples_per_s'], '.2f')} samples/s"
            if "samples_per_s_per_gpu" in e:
                extra = f"{_fmt(e['samples_per_s_per_gpu'], '.2f')} samples/s/GPU"
            if e.get("bandwidth_bound_fraction") is not None:
                extra = f"{100 * e['bandwidth_bound_fraction']:.1f}% of the HBM bound"
            r = result.get("ratio") if side == "titanmm" else None
            if kind == "decode" and side == "titanmm":
                r = (result.get("ratio_by_batch") or {}).get(label.rsplit("=", 1)[-1])
            rows.append([label, _fmt(e.get("tps_per_gpu"), ",.0f"), _fmt(e.get("tflops_per_gpu"), ".1f"),
                         _fmt(None if e.get("mfu") is None else 100 * e["mfu"], ".1f", "%"),
                         _fmt(e.get("peak_mem_gib"), ".1f"), _fmt(r, ".3f"), extra])
    head.append("")
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(wd) if i == 0 else str(c).rjust(wd) for i, (c, wd) in
                       enumerate(zip(row, widths))).rstrip() for row in [head, *rows]]
    title = (f"{result['workload']} on {result['gpus']} x {result['device']} ({result['date']}, "
             f"{result['commit'][:12]})")
    failures = [f"{side} failed: {(result.get(side) or {})['error'].splitlines()[0]}" for side in ("titanmm", "peer")
                if (result.get(side) or {}).get("error")]
    return "\n".join([title, *lines, *failures])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", required=True, choices=sorted(WORKLOADS))
    parser.add_argument("--gpus", type=int, default=None, help="GPUs for both sides (default: the workload's)")
    parser.add_argument("--steps", type=int, default=15, help="training steps per side (training workloads)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median")
    parser.add_argument("--log-freq", type=int, default=1,
                        help="both training sides log (and read their losses from the GPU) every this many steps; "
                             "the median is then over windows of this many steps (each after --warmup)")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--log", default=None, help="file to append both sides' full output to "
                                                    "(default: the results file's name with .log)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for the whole comparison; a process still running then is ended")
    parser.add_argument("--only", choices=["titanmm", "peer"], default=None, help="run one side only")
    parser.add_argument("--titanmm-arg", action="append", default=[], metavar="ARG",
                        help="append ARG to titanmm's command (repeatable; e.g. --titanmm-arg=--compile.enable=false "
                             "for an experiment: the sides are then no longer alike)")
    parser.add_argument("--peer-arg", action="append", default=[], metavar="ARG",
                        help="append ARG to the peer's command (training workloads; repeatable; e.g. "
                             "--peer-arg=--activation_checkpoint.mode --peer-arg=none for torchtitan)")
    parser.add_argument("--titanmm-env", action="append", default=[], metavar="KEY=VALUE",
                        help="set an environment variable for titanmm's processes only (repeatable; recorded in "
                             "its command; e.g. --titanmm-env=NCCL_PROTO=Simple)")
    parser.add_argument("--peer-env", action="append", default=[], metavar="KEY=VALUE",
                        help="set an environment variable for the peer's processes only (repeatable)")
    parser.add_argument("--tag", default="", help="suffix of the results file's name, for a variant of a workload")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of both sides and exit")
    args = parser.parse_args(argv)

    w = WORKLOADS[args.workload]
    gpus = args.gpus or w.gpus
    if w.kind in ("vlm", "decode") and gpus != 1:
        parser.error(f"{w.name} runs on one GPU")
    if args.peer_arg and w.kind == "decode":
        parser.error("--peer-arg applies to the training workloads")
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        parser.error(f"--tag {args.tag!r}: letters, digits, '_', '.', '-' only")
    if w.kind != "decode" and args.steps < args.warmup + args.log_freq:
        parser.error(f"--steps {args.steps} leaves no logged window of --log-freq {args.log_freq} steps after "
                     f"--warmup {args.warmup}")
    side_env = {}
    for side, pairs in (("titanmm", args.titanmm_env), ("peer", args.peer_env)):
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                parser.error(f"--{side}-env {pair!r}: expected KEY=VALUE")
            side_env.setdefault(side, {})[key] = value
    command = shlex.join(["python", "benchmarks/compare.py", *(sys.argv[1:] if argv is None else argv)])

    if args.dry_run:
        work = Path(tempfile.gettempdir()) / f"titanmm_compare_{w.name}"
        print(f"# {w.name}: {gpus} GPU(s); peer {w.peer}")
        for run in plan(w, gpus, args.steps, work, args.titanmm_arg, args.peer_arg, args.log_freq, args.warmup,
                        side_env):
            print(f"# {run.side}: {run.label}\n{run.shell()}")
        return 0

    needs = {"lm": PEERS / "torchtitan" / "launch.py", "vlm": PEERS / "transformers" / "bench_hf.py",
             "decode": PEERS / "transformers" / "bench_hf.py"}.get(w.kind)  # vlm_sft: its peer is in benchmarks/
    if w.kind == "decode" and w.decode_model == "vlm":
        needs = None  # its peer is benchmarks/hf_llava_decode.py
    if args.only != "titanmm" and needs is not None and not (REPO / needs).exists():
        print(f"{needs} is missing: run `bash benchmarks/setup_peers.sh` (and carry .peers)", file=sys.stderr)
        return 2

    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    device = device_name()
    date = datetime.date.today().isoformat()
    stem = f"{date}_{device_slug(device, gpus)}_{w.name}" + (f"_{args.tag}" if args.tag else "") \
        + (f"_{args.only}_only" if args.only else "")
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log) if args.log else results_dir / f"{stem}.log"

    outputs: dict[str, str] = {}
    errors: dict[str, str] = {}
    commands: dict[str, list[str]] = {"titanmm": [], "peer": []}
    work = Path(tempfile.mkdtemp(prefix=f"titanmm_compare_{w.name}_"))
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n##### {command}  ({device}, {date})\n")
        for run in plan(w, gpus, args.steps, work, args.titanmm_arg, args.peer_arg, args.log_freq, args.warmup,
                        side_env):
            run_sides = run.needed_by if run.side == "setup" else (run.side,)
            if args.only and args.only not in run_sides:
                continue
            if all(s in errors for s in run_sides):
                continue
            side = run_sides[0]
            status, text, seconds = execute(run, log, deadline)
            print(f"{run.label}: exit {status} after {seconds:.0f} s", flush=True)
            if run.side == "setup":
                if status:
                    for s in run_sides:
                        errors.setdefault(s, f"setup failed: {_tail(text, 3)}")
                continue
            commands[side].append(run.shell())
            if status:
                reason = "timed out (--time-limit)" if status == 124 else f"exit {status}"
                errors[side] = f"{run.label} {reason}: {_tail(text)}"
                continue
            key = side if run.batch is None else f"{side}:{run.batch}"
            outputs[key] = run.output.read_text() if run.output is not None and run.output.exists() else text
    shutil.rmtree(work, ignore_errors=True)

    sides, extra = summarize(w, outputs, args.warmup, device, errors, args.log_freq, gpus)
    for side in ("titanmm", "peer"):
        if sides[side] is None:
            sides[side] = {"tps_per_gpu": None, "tflops_per_gpu": None, "mfu": None, "peak_mem_gib": None}
        if side in errors:
            sides[side]["error"] = errors[side]
        sides[side]["command"] = " && ".join(commands[side])
    memory = {"lm": "peak reserved (caching allocator), largest of the measured steps",
              "vlm": "peak allocated (transformers' script reports allocated only)",
              "vlm_sft": "peak reserved (caching allocator), largest of the measured steps: titanmm rank 0's, the "
                         "peer's largest over its ranks (their padded batches differ); peak_allocated_gib beside it",
              "decode": "peak allocated"}[w.kind]
    ratio_key = "samples_per_s_per_gpu" if w.kind == "vlm_sft" else "tps_per_gpu"
    result = {
        "workload": w.name, "device": device, "gpus": gpus, "date": date, "commit": commit(), "command": command,
        "peer_name": w.peer, "variant": args.tag or None,
        "settings": settings(w, args.steps, args.warmup, args.log_freq),
        "memory": memory,
        "titanmm": sides["titanmm"], "peer": sides["peer"],
        "ratio": ratio(sides["titanmm"].get(ratio_key), sides["peer"].get(ratio_key)),
        **extra,
    }
    if w.kind == "vlm_sft":
        stats = sft_data_dir(w) / "stats.json"
        if stats.is_file():
            result["dataset"] = json.loads(stats.read_text()).get("lengths")
        result["notes"] = (
            "ratio = titanmm / peer samples/s/GPU. titanmm packs samples into seq_len rows (document-masked "
            "attention); the peer pads each batch to its longest sample. Same samples (titanmm's tokenization), "
            "titanmm in energon's shuffled order, the peer in file order. The peer feeds each sample's unshifted ids "
            "(one token more than titanmm's input; transformers shifts the labels), so both train the same targets; "
            "loss: titanmm averages over the global batch's targets, transformers over each rank's. projector: "
            "titanmm's flavor has Megatron's 1024->14336->4096 MLP, transformers' LlavaMultiModalProjector "
            "1024->4096->4096. TFLOP/s/MFU: language model only, at each side's mean sample length")
    if w.kind == "decode" and w.decode_model == "vlm":
        result["notes"] = ("one image per prompt (bos + 576 image tokens + 128 text tokens), prefill included; "
                           "projector: titanmm's flavor has Megatron's 1024->14336->4096 MLP, transformers' "
                           "LlavaMultiModalProjector 1024->4096->4096 (prefill only). Weight bytes, the bandwidth "
                           "bound and TFLOP/s count the language model only (2N per new token)")
    if w.kind == "vlm":
        result["notes"] = ("projector: titanmm's flavor has Megatron's 1024->14336->4096 MLP, transformers' "
                           "LlavaMultiModalProjector 1024->4096->4096; TFLOP/s/MFU count the language model only "
                           "(6N + attention), the same count on both sides")
    result = targets.annotate(result, results_dir)
    out = results_dir / f"{stem}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(targets.summary(result))
    print(f"wrote {out} (full output in {log_path})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
