"""Workers for the multi-process checkpoint tests (run with torch.multiprocessing.spawn, gloo on CPU)."""

from __future__ import annotations

import torch

import ckpt_helpers as h
from tests.utils import gloo_process_group
from titanmm.checkpoint.states import TrainState


def fsdp_train_and_save(rank: int, world_size: int, port: int, folder: str, ref_path: str, async_mode: str) -> None:
    """Train the FSDP2 model 3 steps, save at step 3, and have rank 0 write the full reference state."""
    with gloo_process_group(rank, world_size, port):
        torch.manual_seed(42)
        model, optim, sched = h.fsdp_build()
        h.train_steps(model, optim, sched, 3)
        states = h.states_of(model, optim, sched, TrainState(step=3))
        ckpt = h.manager(folder, states, interval=3, async_mode=async_mode)
        snap = h.snapshot(states)  # gathers: every rank takes part
        ckpt.save(3)
        ckpt.close()
        if rank == 0:
            torch.save(snap, ref_path)


def fsdp_load(rank: int, world_size: int, port: int, folder: str, out_path: str) -> None:
    """Build a fresh FSDP2 model (different init), resume from `folder` and have rank 0 write the full state."""
    with gloo_process_group(rank, world_size, port):
        model, optim, sched = h.fsdp_build(seed=7)
        states = h.states_of(model, optim, sched)
        step = h.manager(folder, states).load()
        snap = h.snapshot(states)
        if rank == 0:
            snap["loaded_step"] = step
            torch.save(snap, out_path)


def preemption_agreement(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Only rank 1 receives SIGTERM (at step 2); every rank must stop at step 2."""
    import os
    import signal

    from titanmm.utils.signals import PreemptionHandler

    with gloo_process_group(rank, world_size, port):
        with PreemptionHandler() as preemption:
            stopped_at = None
            for step in range(1, 6):
                if rank == 1 and step == 2:
                    os.kill(os.getpid(), signal.SIGTERM)
                if preemption.should_stop():
                    stopped_at = step
                    break
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(f"{stopped_at} {preemption.requested}")
