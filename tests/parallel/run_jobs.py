"""Run several training jobs one after another in one torchrun launch.

    torchrun --nproc_per_node=N tests/parallel/run_jobs.py jobs.json

jobs.json: a list of {"config": TOML path, "overrides": ["--section.key=value", ...]}. Starting the
processes (importing torch) costs more than a tiny test run, so tests that need several runs on
the same number of ranks launch them together. A job that fails stops the launch.
"""

import gc
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from titanmm.config import load_config
from titanmm.train import Trainer


def main(path: str) -> None:
    for job in json.loads(Path(path).read_text()):
        config = load_config(job["config"], job["overrides"], world_size=int(os.environ["WORLD_SIZE"]))
        Trainer(config).train()
        dist.barrier()  # the next job's checkpoint loads may read what this one saved
    gc.collect()  # the trainers' FSDP2 cycles hold process groups: free them now, not at interpreter shutdown
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
