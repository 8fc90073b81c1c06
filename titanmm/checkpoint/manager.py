"""Periodic, atomic, optionally asynchronous training checkpoints.

Layout of the checkpoint folder (`checkpoint.folder`, relative to `job.dump_folder` unless absolute)::

    step-500/          complete checkpoint: DCP files (.metadata, *.distcp) + titanmm.json
    step-1000/
    step-1500.tmp/     being written (or left behind by a crash): ignored by loaders

A save writes into `step-N.tmp/`; once every rank has finished writing, rank 0 adds
`titanmm.json` and renames the folder to `step-N/`. A crash at any point therefore leaves the
previous complete checkpoints untouched and visible, and at worst a `.tmp` folder that the next
successful save deletes.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.stateful import Stateful

from titanmm.checkpoint import format as ckpt_format
from titanmm.config.job_config import Checkpoint

logger = logging.getLogger("titanmm")

TMP_SUFFIX = ".tmp"
# Keys a checkpoint may lack without failing the load (e.g. CUDA RNG saved on a CPU-only run).
OPTIONAL_KEY_PREFIXES = ("train_state.rng.",)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def _single_process_quiet():
    """Silence DCP's warning that it saves/loads in a single process (intended when not distributed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)")
        yield


def _fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside `path` durable (best effort; not all filesystems allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _flatten(state: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts flattened to DCP-style dotted keys (other values are leaves)."""
    if not isinstance(state, dict):
        return {prefix: state}
    flat: dict[str, Any] = {}
    for key, value in state.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class _PendingSave:
    """An asynchronous save in flight."""

    def __init__(self, step: int, tmp_dir: Path, future: Future, started: float):
        self.step, self.tmp_dir, self.future, self.started = step, tmp_dir, future, started


class CheckpointManager:
    """Saves and restores the training states (`model`, `optimizer`, `lr_scheduler`, `train_state`,
    `dataloader`, ...) of a run.

    Args:
        config: the `[checkpoint]` section.
        dump_folder: `job.dump_folder`; a relative `config.folder` lives inside it.
        states: top-level checkpoint keys mapped to Stateful objects (see `titanmm.checkpoint.states`).
            `model` is required for `initial_load_path`.
        meta: keyword arguments of `format.write_meta` (model_name, model_args, tokenizer, ...), written
            to `titanmm.json` of every checkpoint so that it is self-describing.

    All ranks must call `save`, `maybe_finalize`, `load` and `close` at the same points.
    """

    def __init__(self, config: Checkpoint, dump_folder: str, states: dict[str, Stateful], meta: dict):
        if config.async_mode not in ("disabled", "async"):
            raise ValueError(f"checkpoint.async_mode must be 'disabled' or 'async', got {config.async_mode!r}")
        if config.interval < 1:
            raise ValueError(f"checkpoint.interval must be >= 1, got {config.interval}")
        self.config = config
        self.enabled = config.enable
        self.folder = Path(config.folder) if os.path.isabs(config.folder) else Path(dump_folder) / config.folder
        self.states = states
        self.meta = meta
        self.is_async = config.async_mode == "async"
        self._pending: _PendingSave | None = None
        self._last_saved_step: int | None = None
        # Gloo groups (created by every rank, in the same order): one for the background writer
        # thread of async saves, one for coordination from the main thread. Two groups, because
        # collectives from two threads must never interleave on one group.
        self._writer_pg = None
        self._coord_pg = None
        if self.enabled and _distributed():
            self._coord_pg = dist.new_group(backend="gloo")
            if self.is_async:
                self._writer_pg = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------ save

    def save(self, step: int, last: bool = False) -> None:
        """Save at `step` if checkpointing is enabled and `step` is a multiple of the interval (or `last`).

        In async mode this returns once the state is staged to CPU memory; the previous async save
        is finalised first (and waited for when it is still writing). A `last` save is waited for.
        """
        if not self.enabled:
            return
        self.maybe_finalize()
        if not self.due(step, last):
            if last and step == self._last_saved_step:  # e.g. the last step is also an interval step
                self._wait_pending()
            return
        self._wait_pending()
        tmp_dir = self._prepare_tmp_dir(step)
        started = time.perf_counter()
        state = {key: value.state_dict() for key, value in self.states.items()}
        planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)
        if self.is_async:
            future = self._async_save(state, tmp_dir, planner)
            self._pending = _PendingSave(step, tmp_dir, future, started)
            self._last_saved_step = step
            self._log(f"checkpoint step {step}: staged in {time.perf_counter() - started:.2f}s, writing in background")
            if last:
                self._wait_pending()
            return
        try:
            with _single_process_quiet():
                dcp.save(state, checkpoint_id=str(tmp_dir), planner=planner)
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            raise RuntimeError(f"saving checkpoint step {step} to {tmp_dir} failed; the previous checkpoints in "
                               f"{self.folder} are intact") from e
        self._last_saved_step = step
        self._commit(step, tmp_dir, started)

    def due(self, step: int, last: bool = False) -> bool:
        """Whether `save(step, last)` writes a checkpoint."""
        return (self.enabled and step != self._last_saved_step
                and (step % self.config.interval == 0 or last))

    def _async_save(self, state: dict[str, Any], tmp_dir: Path, planner) -> Future:
        """Start `dcp.async_save` (it copies the state to CPU before returning) and return its future."""
        with _single_process_quiet():
            response = dcp.async_save(state, checkpoint_id=str(tmp_dir), planner=planner, process_group=self._writer_pg)
        # torch >= 2.8 may return an AsyncSaveResponse (staging + upload futures) instead of a Future.
        return getattr(response, "upload_completion", response)

    def maybe_finalize(self) -> None:
        """Commit the async save in flight if every rank has finished writing it; never blocks on the write."""
        if self._pending is None:
            return
        if self._all_ranks(self._pending.future.done()):
            self._finish_pending()

    def _wait_pending(self) -> None:
        if self._pending is not None:
            self._finish_pending()  # blocks until the write is done

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        error = pending.future.exception()
        if not self._all_ranks(error is None):
            self._last_saved_step = None
            raise RuntimeError(f"asynchronous save of checkpoint step {pending.step} to {pending.tmp_dir} failed "
                               f"(on this rank: {error!r}); the previous checkpoints in {self.folder} are intact"
                               ) from error
        self._commit(pending.step, pending.tmp_dir, pending.started)

    def _prepare_tmp_dir(self, step: int) -> Path:
        """Rank 0 creates an empty `step-N.tmp/` (removing one a crash left); then all ranks go on."""
        tmp_dir = self.folder / f"step-{step}{TMP_SUFFIX}"
        if _rank() == 0:
            if tmp_dir.exists():
                shutil.rmtree(tmp_dir)
            tmp_dir.mkdir(parents=True)
        self._barrier()
        return tmp_dir

    def _commit(self, step: int, tmp_dir: Path, started: float) -> None:
        """After all ranks wrote: rank 0 adds titanmm.json, renames to `step-N/` and purges old checkpoints."""
        self._barrier()
        final_dir = self.folder / f"step-{step}"
        error: BaseException | None = None
        if _rank() == 0:
            try:
                ckpt_format.write_meta(tmp_dir, **self.meta)
                self._fsync_file(tmp_dir / ckpt_format.META_FILE)
                _fsync_dir(tmp_dir)
                self._replace_dir(tmp_dir, final_dir)
                self._purge(keep=step)
            except Exception as e:  # tell the other ranks instead of leaving them in a barrier
                error = e
        if not self._all_ranks(error is None):
            raise RuntimeError(f"committing checkpoint step {step} ({tmp_dir} -> {final_dir}) failed on rank 0"
                               + (f": {error!r}" if error else "")) from error
        self._log(f"saved checkpoint step {step} to {final_dir} in {time.perf_counter() - started:.2f}s")

    @staticmethod
    def _fsync_file(path: Path) -> None:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())

    def _replace_dir(self, tmp_dir: Path, final_dir: Path) -> None:
        """Rename `tmp_dir` to `final_dir`, moving an existing `final_dir` (same step saved again) aside first."""
        if final_dir.exists():
            stale = final_dir.with_name(final_dir.name + ".old" + TMP_SUFFIX)
            if stale.exists():
                shutil.rmtree(stale)
            os.replace(final_dir, stale)
        os.replace(tmp_dir, final_dir)
        _fsync_dir(self.folder)

    def _purge(self, keep: int) -> None:
        """Delete stale `.tmp` folders and, with keep_latest_k > 0, all but the newest k complete checkpoints
        (never step `keep`, the one just written)."""
        for child in self.folder.iterdir():
            if child.is_dir() and child.name.startswith("step-") and child.name.endswith(TMP_SUFFIX):
                logger.info(f"removing incomplete checkpoint {child}")
                shutil.rmtree(child, ignore_errors=True)
        k = self.config.keep_latest_k
        if k <= 0:
            return
        steps = ckpt_format.list_steps(self.folder)
        kept = set(steps[-k:]) | {keep}
        for old in steps:
            if old not in kept:
                logger.info(f"removing old checkpoint {self.folder / f'step-{old}'} (keep_latest_k={k})")
                shutil.rmtree(self.folder / f"step-{old}", ignore_errors=True)

    # ------------------------------------------------------------------ load

    def load(self, step: int = -1) -> int:
        """Restore the run and return the step to continue from.

        1. With checkpointing enabled and a complete checkpoint in the folder: load every state from it
           (step `step`, else `checkpoint.load_step`, else the latest) and return its step.
        2. Else with `initial_load_path`: load only the model weights from that titanmm checkpoint (a
           checkpoint folder, or a run folder whose latest step is used); return 0.
        3. Else return 0 (fresh start). `initial_load_hf` is not handled here: when this returns 0 the
           trainer fills the model with `titanmm.checkpoint.hf_load.load_hf_into_model`.
        """
        step = step if step != -1 else self.config.load_step
        if self.enabled and ckpt_format.list_steps(self.folder):
            directory = ckpt_format.resolve_checkpoint_dir(self.folder, step)
            started = time.perf_counter()
            self._load_into(self.states, directory)
            loaded = int(directory.name.split("-", 1)[1])
            self._log(f"resumed from checkpoint {directory} (step {loaded}) in {time.perf_counter() - started:.2f}s")
            return loaded
        if self.enabled and step != -1:
            raise FileNotFoundError(f"checkpoint.load_step={step} but {self.folder} holds no complete checkpoint")
        if self.config.initial_load_path:
            directory = ckpt_format.resolve_checkpoint_dir(self.config.initial_load_path)
            self._load_into({"model": self._model_state()}, directory)
            self._log(f"initialised model weights from {directory}")
            return 0
        return 0

    def _model_state(self) -> Stateful:
        if "model" not in self.states:
            raise KeyError("CheckpointManager states have no 'model' entry to initialise from")
        return self.states["model"]

    def _load_into(self, states: dict[str, Stateful], directory: Path) -> None:
        """`dcp.load` the given states from `directory`, with errors that name the checkpoint and the key."""
        state = {key: value.state_dict() for key, value in states.items()}
        metadata = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        problem = self._first_mismatch(state, metadata)
        if problem and not problem[1]:
            raise RuntimeError(f"cannot load checkpoint {directory}: {problem[0]}")
        partial = any(k not in metadata for k in _flatten(state))  # only optional keys may be missing here
        try:
            with _single_process_quiet():
                dcp.load(state, checkpoint_id=str(directory), planner=DefaultLoadPlanner(allow_partial_load=partial))
        except (Exception, CheckpointException) as e:
            raise RuntimeError(f"loading checkpoint {directory} failed: {e}") from e
        for key, value in states.items():
            value.load_state_dict(state[key])

    @staticmethod
    def _first_mismatch(state: dict[str, Any], metadata: dict[str, Any]) -> tuple[str, bool] | None:
        """(description, harmless) of the first key whose presence or shape differs from the checkpoint."""
        optional = None
        for key, value in _flatten(state).items():
            if key not in metadata:
                if any(k.startswith(key + ".") for k in metadata):
                    continue  # a container DCP flattened further (e.g. a list of tensors)
                if key.startswith(OPTIONAL_KEY_PREFIXES):
                    optional = (f"{key} missing (optional)", True)
                    continue
                return f"key {key!r} is missing from the checkpoint", False
            saved_size = getattr(metadata[key], "size", None)
            if isinstance(value, torch.Tensor):
                if saved_size is None:
                    return f"key {key!r} is a tensor here but not in the checkpoint", False
                if tuple(saved_size) != tuple(value.shape):
                    return (f"key {key!r} has shape {tuple(saved_size)} in the checkpoint but "
                            f"{tuple(value.shape)} in the model being loaded"), False
        return optional

    # ------------------------------------------------------------------ misc

    def close(self) -> None:
        """Wait for and commit any async save in flight."""
        if self.enabled:
            self._wait_pending()

    def _all_ranks(self, flag: bool) -> bool:
        """True when `flag` holds on every rank."""
        if self._coord_pg is None:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self._coord_pg)
        return bool(t.item())

    def _barrier(self) -> None:
        if self._coord_pg is not None:
            dist.barrier(group=self._coord_pg)

    @staticmethod
    def _log(message: str) -> None:
        if _rank() == 0:
            logger.info(message)
