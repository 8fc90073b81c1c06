"""Shared helpers for the checkpoint tests, importable by spawned worker processes and subprocess scripts."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from tests.utils import free_port  # noqa: F401  (the checkpoint tests take it from here)
from titanmm.checkpoint.manager import CheckpointManager
from titanmm.checkpoint.states import ModelState, OptimizerState, SchedulerState, TrainState
from titanmm.config.job_config import Checkpoint
from titanmm.models.llama import LLAMA_FLAVORS, Transformer

FLAVOR = "debug_llama3.1"


def build(flavor: str = FLAVOR, seed: int = 0, freeze_embeddings: bool = False):
    """A small model (deterministic init from `seed`), AdamW and a warm-up LambdaLR."""
    model = Transformer(LLAMA_FLAVORS[flavor])
    model.init_weights(seed=seed)
    if freeze_embeddings:
        # Like the trainer: frozen parameters are left out, matrices and vectors in separate groups.
        model.tok_embeddings.weight.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if p.dim() >= 2]},
                  {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    else:
        groups = model.parameters()
    optim = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: min(1.0, (step + 1) / 10))
    return model, optim, sched


def train_steps(model, optim, sched, n: int, seed: int = 1234) -> None:
    """`n` optimizer steps on fixed random batches (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.args.vocab_size
    for _ in range(n):
        tokens = torch.randint(0, vocab, (2, 16), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        optim.step()
        sched.step()
        optim.zero_grad()


def states_of(model, optim, sched, train_state: TrainState | None = None) -> dict:
    return {"model": ModelState([model]), "optimizer": OptimizerState([model], [optim]),
            "lr_scheduler": SchedulerState([sched]), "train_state": train_state or TrainState()}


def manager(folder: str, states: dict, flavor: str = FLAVOR, **config) -> CheckpointManager:
    cfg = Checkpoint(enable=True, folder=folder, **config)
    return CheckpointManager(cfg, dump_folder=os.path.dirname(folder), states=states,
                             meta=dict(model_name="llama", model_args=LLAMA_FLAVORS[flavor], tokenizer=""))


def full_tensors(state: dict) -> dict:
    """A state dict with DTensors gathered to full plain tensors (a collective under FSDP) and cloned."""
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            value = value.full_tensor() if hasattr(value, "full_tensor") else value
            value = value.detach().clone()
        out[key] = value
    return out


def snapshot(states: dict) -> dict:
    """Full copies of every state (model, optimizer, scheduler, train state) for bitwise comparison."""
    snap = {name: full_tensors(states[name].state_dict()) for name in ("model", "optimizer", "lr_scheduler")}
    ts = states["train_state"].state_dict()
    snap["train_state"] = {k: v for k, v in ts.items() if k != "rng"}
    snap["rng"] = {k: v.clone() for k, v in ts["rng"].items()}
    return snap


def assert_same(a, b, path: str = "") -> None:
    """Recursive bitwise equality of (nested) dicts of tensors and plain values."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys differ: {set(a) ^ set(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b)}"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{path}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        assert torch.equal(a, b), f"{path}: values differ (max abs diff {(a.double() - b.double()).abs().max()})"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def scramble_rng() -> None:
    torch.rand(7)
    random.random()
    np.random.rand(3)


def fsdp_build(flavor: str = FLAVOR, seed: int = 0):
    """The model of `build`, sharded with FSDP2 over all ranks (CPU, gloo), with its optimizer and scheduler."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = Transformer(LLAMA_FLAVORS[flavor])
    model.init_weights(seed=seed)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda step: min(1.0, (step + 1) / 10))
    return model, optim, sched
