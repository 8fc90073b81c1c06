"""Measure titanmm training throughput and write a results file.

    python benchmarks/train_throughput.py --workload llama3_8b_8layers_bf16 --nproc 1 -- \
        --config train_configs/llama3_8b.toml --model.n_layers=8 --training.steps=30

Runs `torchrun -m titanmm.train` with the given arguments (mock data unless told otherwise),
drops the first `--warmup` logged steps, and reports the median of the rest: tokens/s/GPU,
TFLOP/s/GPU, MFU and peak memory. Writes benchmarks/results/<date>_<device>_<workload>.json
with the device, date, commit and exact command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

from results_io import command_line, commit  # noqa: E402


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", required=True, help="name used in the results file")
    parser.add_argument("--nproc", type=int, default=1, help="GPUs (processes) on this node")
    parser.add_argument("--warmup", type=int, default=3, help="logged steps left out of the median")
    parser.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments for titanmm.train, after --")
    args = parser.parse_args(argv)
    train_args = [a for a in args.train_args if a != "--"]
    dump = Path(tempfile.mkdtemp(prefix="titanmm_bench_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "titanmm.train", *train_args, f"--job.dump_folder={dump}", "--metrics.log_freq=1",
           "--checkpoint.enable=false", "--metrics.plot_loss=false", "--metrics.enable_tensorboard=false"]
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    records = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    measured = records[args.warmup:]
    if not measured:
        raise SystemExit(f"only {len(records)} logged steps; need more than --warmup={args.warmup}")

    def median(key):
        values = [r[key] for r in measured if r.get(key) is not None]
        return statistics.median(values) if values else None

    device = device_name()
    result = {
        "workload": args.workload, "device": device, "gpus": args.nproc,
        "date": datetime.date.today().isoformat(), "commit": commit(),
        "command": command_line("train_throughput.py", argv),
        "titanmm": {"tps_per_gpu": median("tps_per_gpu"), "tflops_per_gpu": median("tflops_per_gpu"),
                    "mfu": median("mfu"), "peak_mem_gib": max(r.get("peak_mem_gib") or 0 for r in records),
                    "final_loss": records[-1]["loss"], "measured_steps": len(measured)},
    }
    slug = device.replace("NVIDIA ", "").replace(" ", "_").lower()
    out = Path(args.results_dir) / f"{result['date']}_{slug}_{args.workload}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
