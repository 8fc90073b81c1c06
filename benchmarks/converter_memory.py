"""Peak memory of the checkpoint converters on a synthetic multi-GB Llama checkpoint (CPU).

    PYTHONPATH=. python benchmarks/converter_memory.py [--n-layers 20] [--shard-size 1GB] [--keep]

Writes a random bf16 Hugging Face checkpoint (several safetensors shards, written tensor by
tensor), then runs `python -m converters.hf_lm` and `python -m converters.export_hf` as
subprocesses and records each one's peak resident memory (ru_maxrss of a dedicated wrapper
process's children), wall time, and the checkpoint's sizes. Results are printed and saved to
`benchmarks/results/<date>_cpu_converter_memory.json`. The synthetic data is deleted afterwards
unless --keep is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from converters.common import (group_by_bytes, parse_size, shard_file_names, tensor_nbytes,  # noqa: E402
                               write_safetensors_streaming)
from titanmm.checkpoint.hf_mapping import (hf_config_from_args, hf_names_for_export,  # noqa: E402
                                           titanmm_state_shapes, titanmm_to_hf_name)
from titanmm.models.llama.args import TransformerArgs  # noqa: E402
from results_io import commit  # noqa: E402

# Runs a command and reports the peak RSS of its process tree as the last line of stdout.
_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.run(sys.argv[1:]).returncode
wall = time.perf_counter() - start
print(json.dumps({"rc": rc, "wall_s": wall, "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/titanmm_converter_memory")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--n-layers", type=int, default=20)
    p.add_argument("--n-heads", type=int, default=16)
    p.add_argument("--n-kv-heads", type=int, default=8)
    p.add_argument("--ffn-hidden-dim", type=int, default=8192)
    p.add_argument("--vocab-size", type=int, default=128256)
    p.add_argument("--shard-size", default="1GB", help="size of the synthetic safetensors shards")
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--skip-export", action="store_true", help="measure only converters.hf_lm")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and outputs")
    return p.parse_args(argv)


def synthetic_args(a: argparse.Namespace) -> TransformerArgs:
    return TransformerArgs(dim=a.dim, n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                           ffn_hidden_dim=a.ffn_hidden_dim, vocab_size=a.vocab_size, max_seq_len=8192)


def write_synthetic_hf(args: TransformerArgs, directory: Path, shard_size: int) -> dict:
    """Random bf16 HF checkpoint written one tensor at a time; returns its size statistics."""
    directory.mkdir(parents=True, exist_ok=True)
    shapes = titanmm_state_shapes(args)
    names = hf_names_for_export(args)
    dtype = torch.bfloat16
    shards = group_by_bytes(names, lambda n: tensor_nbytes(tuple(shapes[n]), dtype), shard_size)
    files = shard_file_names(len(shards))
    generator = torch.Generator().manual_seed(0)
    weight_map, shard_bytes = {}, []
    for file, group in zip(files, shards):
        header = [(titanmm_to_hf_name(n), tuple(shapes[n]), dtype) for n in group]
        tensors = (torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=generator) for _, shape, _ in header)
        write_safetensors_streaming(directory / file, header, tensors)
        weight_map.update({name: file for name, _, _ in header})
        shard_bytes.append((directory / file).stat().st_size)
        print(f"wrote {file}: {shard_bytes[-1] / 1e9:.2f} GB", flush=True)
    total = sum(tensor_nbytes(tuple(shapes[n]), dtype) for n in names)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (directory / "config.json").write_text(json.dumps(hf_config_from_args(args, dtype=dtype), indent=2))
    return {"checkpoint_bytes": total, "num_shards": len(files), "largest_shard_bytes": max(shard_bytes),
            "largest_tensor_bytes": max(tensor_nbytes(tuple(shapes[n]), dtype) for n in names),
            "num_tensors": len(names), "num_params": args.num_params()}


def measure(command: list[str]) -> dict:
    """Run `command` under a fresh wrapper process; returns rc, wall time and peak RSS (bytes)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _WRAPPER, *command], cwd=REPO, env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {result['rc']}")
    return {"peak_rss_bytes": result["maxrss_kib"] * 1024, "wall_s": round(result["wall_s"], 2)}


def spot_check(original: Path, exported: Path,
               names=("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")) -> bool:
    """Whether a few tensors (and the last layer's) came back bit for bit through HF -> titanmm -> HF."""
    from titanmm.checkpoint.hf_load import hf_tensor_infos, read_hf_tensor

    before, after = hf_tensor_infos(original), hf_tensor_infos(exported)
    last_layer = max(int(n.split(".")[2]) for n in before if n.startswith("model.layers."))
    names = [*names, f"model.layers.{last_layer}.mlp.down_proj.weight"]
    return before.keys() == after.keys() and all(
        torch.equal(read_hf_tensor(before[n]), read_hf_tensor(after[n])) for n in names)


def dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def main(argv=None) -> dict:
    a = parse_args(argv)
    work = Path(a.workdir)
    hf_dir, ckpt, export_dir = work / "hf", work / "titanmm", work / "hf_export"
    shutil.rmtree(work, ignore_errors=True)
    try:
        stats = write_synthetic_hf(synthetic_args(a), hf_dir, parse_size(a.shard_size))
        python = [sys.executable]
        runs = {"interpreter_baseline": (python + ["-c", "import torch, torch.distributed.checkpoint, safetensors, "
                                                   "converters.hf_lm, converters.export_hf"]),
                "hf_lm": python + ["-m", "converters.hf_lm", "--hf-dir", str(hf_dir), "--output", str(ckpt),
                                   "--no-progress"]}
        if not a.skip_export:
            runs["export_hf"] = python + ["-m", "converters.export_hf", "--checkpoint", str(ckpt), "--output",
                                          str(export_dir), "--max-shard-size", a.shard_size, "--no-progress"]
        measurements = {}
        for label, command in runs.items():
            measurements[label] = {**measure(command), "command": " ".join(command)}
            print(f"{label}: peak RSS {measurements[label]['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"{measurements[label]['wall_s']} s", flush=True)
        measurements["hf_lm"]["output_bytes"] = dir_bytes(ckpt)
        if "export_hf" in measurements:
            measurements["export_hf"]["output_bytes"] = dir_bytes(export_dir)
            measurements["export_hf"]["round_trip_identical"] = spot_check(hf_dir, export_dir)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "benchmark": "converter_memory", "date": now.isoformat(timespec="seconds"), "git_commit": commit(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                 "torch": torch.__version__},
        "synthetic_model": {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
                            "ffn_hidden_dim": a.ffn_hidden_dim, "vocab_size": a.vocab_size, "dtype": "bf16",
                            **stats},
        "runs": measurements,
        "benchmark_command": " ".join([sys.executable, *sys.argv]),
    }
    results_dir = Path(a.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{now:%Y-%m-%d}_cpu_converter_memory.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
