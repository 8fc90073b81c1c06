"""Fixtures shared by the test files."""

import os

import pytest
import torch.distributed as dist

_LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def in_process(monkeypatch):
    """Run a Trainer inside the test process (a one-rank gloo group)."""
    for key in _LAUNCHER_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    for key in _LAUNCHER_VARIABLES:
        os.environ.pop(key, None)
