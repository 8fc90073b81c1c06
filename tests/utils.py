"""Helpers for tests that launch real training runs (torchrun, gloo, CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEBUG_CONFIG = REPO / "train_configs" / "debug_llama.toml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(nproc: int, dump_folder: Path, overrides: list[str], config: Path = DEBUG_CONFIG) -> list[str]:
    # --standalone lets the launcher bind its own free port (no race with other processes for it).
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + ["-m", "titanmm.train", "--config", str(config), f"--job.dump_folder={dump_folder}",
                       "--metrics.log_freq=1", "--metrics.enable_tensorboard=false", "--metrics.plot_loss=false",
                       *overrides]


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_training(nproc: int, dump_folder: Path, overrides: list[str], expect_ok: bool = True,
                 timeout: int = 600, config: Path = DEBUG_CONFIG) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_command(nproc, dump_folder, overrides, config=config), cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"training failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def logged(dump_folder: Path, key: str = "loss") -> dict[int, float]:
    """step -> value from metrics.jsonl (the last record of a step wins, as after a resume)."""
    values = {}
    with open(dump_folder / "metrics.jsonl") as f:
        for line in f:
            record = json.loads(line)
            values[record["step"]] = record[key]
    return values
