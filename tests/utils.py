"""Helpers for tests that launch real training runs (torchrun, gloo, CPU)."""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import gc
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


@contextlib.contextmanager
def gloo_process_group(rank: int, world_size: int, port: int):
    """A gloo process group for one worker of `torch.multiprocessing.spawn`, torn down in step with the others.

    A rank that destroys its group and exits while another is still inside a gloo call can abort that rank
    natively ("terminate called without an active exception"), so ranks meet at a barrier first. So can a group
    that cyclic garbage (FSDP2's modules and their states) keeps alive until the interpreter shuts down: at exit,
    before the shutdown, the garbage is collected. faulthandler makes any native abort print the Python stack.
    """
    import torch.distributed as dist

    atexit.register(gc.collect)
    faulthandler.enable()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is a folder of scripts, not a package), loaded once."""
    import importlib.util

    module_name = f"_titanmm_benchmarks_{name}"
    if str(REPO / "benchmarks") not in sys.path:  # the scripts import each other, as when run from there
        sys.path.insert(0, str(REPO / "benchmarks"))
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


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
