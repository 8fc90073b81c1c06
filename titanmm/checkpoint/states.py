"""Stateful wrappers that DCP saves and loads: model, optimizer, LR scheduler and train state.

Each wrapper returns a layout-free state dict (keys are parameter FQNs, not shard indices), so a
checkpoint written under one parallel layout (plain, FSDP2, TP, several pipeline stages) loads
under another. Values that must be the same on every rank are produced identically by every rank:
DCP then writes one copy of each replicated entry.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from titanmm.utils.tensors import without_wrapper

__all__ = ["ModelState", "OptimizerState", "SchedulerState", "TrainState"]


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _plain_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """The state with wrapper-subclass tensors (FP8 all-gather weights, and the optimizer moments made from
    them) as the plain tensors they wrap, sharing storage (loads write through them). DCP pickles a subclass
    by its class path: such a checkpoint would load only where that class is imported and allowlisted, not in
    a bf16 run, a converter or an environment without torchao."""
    return {key: without_wrapper(value) if isinstance(value, torch.Tensor) else value for key, value in state.items()}


class ModelState(Stateful):
    """The parameters and persistent buffers of one or more model parts (pipeline stages).

    The parts' state dicts are merged into one FQN-keyed dict; on load each part takes its own keys.
    """

    def __init__(self, model_parts: list[nn.Module] | nn.Module):
        self.model_parts = _as_list(model_parts)

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in self.model_parts:
            merged.update(_plain_tensors(get_model_state_dict(part)))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # With several parts each one sees keys of the others, so only a single part is strict.
        options = StateDictOptions(strict=len(self.model_parts) == 1)
        for part in self.model_parts:
            set_model_state_dict(part, state_dict, options=options)


class OptimizerState(Stateful):
    """Optimizer state of each model part, flattened to `state.<fqn>.<name>` / `param_groups.<fqn>.<name>`.

    `optimizers` holds one optimizer per model part (a single optimizer is accepted for a single
    part). Frozen parameters have no optimizer state and no entry. Keys are FQNs, so the state
    reshards across layouts.
    """

    _OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, model_parts: list[nn.Module] | nn.Module, optimizers):
        self.model_parts = _as_list(model_parts)
        self.optimizers = _as_list(optimizers)
        if len(self.model_parts) != len(self.optimizers):
            raise ValueError(f"OptimizerState needs one optimizer per model part; got {len(self.model_parts)} "
                             f"parts and {len(self.optimizers)} optimizers")

    def state_dict(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part, optim in zip(self.model_parts, self.optimizers):
            merged.update(_plain_tensors(get_optimizer_state_dict(part, optim, options=self._OPTIONS)))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part, optim in zip(self.model_parts, self.optimizers):
            set_optimizer_state_dict(part, optim, optim_state_dict=state_dict, options=self._OPTIONS)


_SCHEDULER_SKIP = ("optimizer", "lr_lambdas")


def _plain_value(value) -> bool:
    """True for values the scheduler state may keep: numbers, strings, tensors and lists of those."""
    if isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, (bool, int, float, torch.Tensor)) for v in value)
    return False


class SchedulerState(Stateful):
    """LR scheduler state: its step counters (`last_epoch`, `_step_count`, ...).

    Only plain scalar values are kept. Lambdas and other callables (LambdaLR's `lr_lambdas`) come
    from the code that rebuilds the scheduler; so do the per-parameter-group lists (`base_lrs`,
    `_last_lr`), whose length depends on how a layout groups the parameters (by device mesh, by
    pipeline stage): the learning rates follow from the schedule and the step. With one scheduler
    per model part all of them follow the same schedule, so the first one is saved and loaded into all.
    """

    def __init__(self, schedulers):
        self.schedulers = _as_list(schedulers)
        if not self.schedulers:
            raise ValueError("SchedulerState needs at least one scheduler")

    def state_dict(self) -> dict[str, Any]:
        full = self.schedulers[0].state_dict()
        return {k: v for k, v in full.items()
                if k not in _SCHEDULER_SKIP and _plain_value(v) and not isinstance(v, (list, tuple))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for scheduler in self.schedulers:
            # Start from the scheduler's own dict so entries we never saved (lr_lambdas, base_lrs) stay as built.
            current = scheduler.state_dict()
            current.update({k: v for k, v in state_dict.items()
                            if k not in _SCHEDULER_SKIP and not isinstance(v, (list, tuple))})
            scheduler.load_state_dict(current)
            if hasattr(scheduler, "lr_lambdas"):  # the learning rates of the restored step
                scheduler._last_lr = [base * fn(scheduler.last_epoch)
                                      for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]


# RNG states are stored as fixed-size uint8 tensors so that DCP can load them in place (DCP loads
# into tensors of the shapes that `state_dict()` returns). Python's and NumPy's Mersenne Twister
# states are encoded explicitly (no pickle).
_MT_WORDS = 624


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _python_rng_encode() -> torch.Tensor:
    version, internal, gauss = random.getstate()
    words = np.asarray(internal, dtype="<u4").tobytes()  # 624 words + position
    tail = struct.pack("<IId", version, gauss is not None, 0.0 if gauss is None else gauss)
    return _bytes_tensor(words + tail)


def _python_rng_decode(t: torch.Tensor) -> None:
    raw = t.numpy().tobytes()
    n = (_MT_WORDS + 1) * 4
    internal = tuple(int(w) for w in np.frombuffer(raw[:n], dtype="<u4"))
    version, has_gauss, gauss = struct.unpack("<IId", raw[n:])
    random.setstate((version, internal, gauss if has_gauss else None))


def _numpy_rng_encode() -> torch.Tensor:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    if name != "MT19937":
        raise ValueError(f"unsupported numpy RNG {name!r}")
    return _bytes_tensor(np.asarray(keys, dtype="<u4").tobytes() + struct.pack("<IId", pos, has_gauss, gauss))


def _numpy_rng_decode(t: torch.Tensor) -> None:
    raw = t.numpy().tobytes()
    n = _MT_WORDS * 4
    keys = np.frombuffer(raw[:n], dtype="<u4").copy()
    pos, has_gauss, gauss = struct.unpack("<IId", raw[n:])
    np.random.set_state(("MT19937", keys, pos, has_gauss, gauss))


class TrainState(Stateful):
    """Step, non-finite-loss skip counters and RNG states.

    RNG states (torch CPU, CUDA of the current device when available, Python `random`, NumPy) are
    uint8 tensors. Every rank saves its own RNG under the same key and the checkpoint manager asks
    DCP to keep the lowest rank's copy, so a checkpoint holds rank 0's RNG; on load (under any world
    size) every rank restores rank 0's RNG. Per-rank random streams should therefore be derived
    from a seed and the rank rather than from the global RNG. A checkpoint written without CUDA
    and loaded with CUDA (or the reverse) restores the RNGs present in both.
    """

    def __init__(self, step: int = 0):
        self.step = step
        self.consecutive_nonfinite_skips = 0
        self.total_nonfinite_skips = 0

    @staticmethod
    def rng_state() -> dict[str, torch.Tensor]:
        state = {"torch_cpu": torch.get_rng_state().clone(), "python": _python_rng_encode(),
                 "numpy": _numpy_rng_encode()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state().clone()
        return state

    @staticmethod
    def set_rng_state(state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["torch_cpu"].to(torch.uint8).cpu())
        _python_rng_decode(state["python"].cpu())
        _numpy_rng_decode(state["numpy"].cpu())
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"].to(torch.uint8).cpu())

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": torch.tensor(self.step, dtype=torch.int64),
            "consecutive_nonfinite_skips": torch.tensor(self.consecutive_nonfinite_skips, dtype=torch.int64),
            "total_nonfinite_skips": torch.tensor(self.total_nonfinite_skips, dtype=torch.int64),
            "rng": self.rng_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.consecutive_nonfinite_skips = int(state_dict.get("consecutive_nonfinite_skips", 0))
        self.total_nonfinite_skips = int(state_dict.get("total_nonfinite_skips", 0))
        if "rng" in state_dict:
            self.set_rng_state(state_dict["rng"])
