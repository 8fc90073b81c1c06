"""titanmm.train on real image-text data: LLaVA JSON + PNGs -> convert_llava -> energon prepare -> torchrun
(gloo, CPU) with the debug_vlm flavor: packing, sqrt-length loss scaling and skipped samples in metrics.jsonl
(one rank); FSDP2 over two ranks with a frozen vision tower (frozen weights bitwise unchanged, no optimizer
state for them) and an exact resume of the data stream from a checkpoint."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

pytest.importorskip("megatron.energon")

import titanmm  # noqa: E402
from tests.llava_data import write_llava_dataset  # noqa: E402
from tests.utils import REPO, logged, run_training  # noqa: E402
from titanmm.models import get_model_spec  # noqa: E402

VLM_CONFIG = REPO / "train_configs" / "debug_vlm.toml"
COMMON = ["--training.seq_len=128", "--lr_scheduler.warmup_steps=1", "--multimodal.num_workers=1"]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return write_llava_dataset(tmp_path_factory.mktemp("llava"))


def records(folder):
    with open(folder / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f)}


@pytest.mark.slow
def test_packed_training_counts_skipped_samples(llava, tmp_path):
    run_training(1, tmp_path, COMMON + [f"--training.dataset={llava}", "--training.steps=3",
                                        "--training.local_batch_size=2", "--training.global_batch_size=4",
                                        "--multimodal.shuffle_buffer_size=0", "--multimodal.packing=true",
                                        "--multimodal.packing_buffer_size=8", "--multimodal.loss_scaling=sqrt_length"],
                 config=VLM_CONFIG)
    metrics = records(tmp_path)
    assert all(math.isfinite(metrics[s]["loss"]) for s in (1, 2, 3))
    # 3 steps x 4 packed rows hold more than the 10 good samples: the first pass with its two corrupt PNGs was read
    assert metrics[3]["skipped_samples"] >= 2 and metrics[3]["skipped_samples/corrupt_image"] >= 2
    assert 0.6 < metrics[3]["packing_efficiency"] <= 1


def _checkpoint_keys(step_dir):
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata)


@pytest.mark.slow
def test_fsdp_frozen_vision_and_exact_resume(llava, tmp_path):
    overrides = COMMON + [f"--training.dataset={llava}", "--training.steps=4", "--training.local_batch_size=1",
                          "--training.global_batch_size=4", "--model.freeze=vision", "--checkpoint.enable=true",
                          "--checkpoint.interval=2"]
    straight = tmp_path / "straight"
    run_training(2, straight, overrides, config=VLM_CONFIG)
    losses = logged(straight)
    assert all(math.isfinite(losses[s]) for s in (1, 2, 3, 4))

    # frozen weights are bitwise the initial ones; trained ones moved; no optimizer state for frozen ones
    args = get_model_spec("vlm").flavors["debug_vlm"]
    initial = get_model_spec("vlm").model_cls(args)
    initial.init_weights(seed=42)  # training.seed of debug_vlm.toml
    trained = titanmm.load(straight / "checkpoint" / "step-4")
    for name, p in initial.named_parameters():
        same = torch.equal(p, trained.get_parameter(name))
        assert same == name.startswith("vision."), name
    keys = _checkpoint_keys(straight / "checkpoint" / "step-4")
    assert not any(k.startswith("optimizer.state.vision.") for k in keys)
    assert any(k.startswith("optimizer.state.projector.") for k in keys)
    assert any(k.startswith("optimizer.state.lm.") for k in keys) and "dataloader.energon" in keys

    # resume from step 2 in a fresh run folder: steps 3 and 4 see the same batches, hence the same losses
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint" / "step-2", resumed / "checkpoint" / "step-2")
    run_training(2, resumed, overrides, config=VLM_CONFIG)
    after = logged(resumed)
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        assert after[step] == pytest.approx(losses[step], rel=1e-6), step
