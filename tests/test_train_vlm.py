"""The trainer on a vision-language model: layouts agree, and a combined checkpoint trains."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import titanmm
from tests.utils import REPO, logged, run_env, run_training, train_command
from titanmm.checkpoint.format import save_model
from titanmm.data import StepBatcher
from titanmm.data.mock_multimodal import MockMultimodalDataset
from titanmm.models import get_model_spec

VLM_CONFIG = REPO / "train_configs" / "debug_vlm.toml"
COMMON = ["--training.steps=3", "--training.seq_len=96", "--training.global_batch_size=4",
          "--lr_scheduler.warmup_steps=1"]


def _run(nproc, folder, overrides):
    cmd = train_command(nproc, folder, COMMON + overrides, config=VLM_CONFIG)
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return logged(folder)


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory):
    return _run(1, tmp_path_factory.mktemp("vlm_single"), ["--training.local_batch_size=2"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fsdp2", "tp2", "fsdp2_loss_chunks"])
def test_vlm_layouts_match_single_process(single_process_losses, tmp_path, layout):
    overrides = {"fsdp2": ["--training.local_batch_size=2"],
                 "tp2": ["--training.local_batch_size=2", "--parallelism.tensor_parallel_degree=2"],
                 # the output layer returning the loss, 64 tokens at a time
                 "fsdp2_loss_chunks": ["--training.local_batch_size=2", "--training.loss_chunk_tokens=64"]}[layout]
    losses = _run(2, tmp_path, overrides)
    for step, ref in single_process_losses.items():
        assert abs(losses[step] - ref) <= 1e-5 * ref, (layout, step, losses[step], ref)


@pytest.mark.slow
def test_combined_checkpoint_trains(tmp_path):
    """converters.combine output -> titanmm.train (initial_load_path): step 1's loss is the combined model's."""
    vlm_args = get_model_spec("vlm").flavors["debug_vlm"]
    lm = get_model_spec("llama").model_cls(vlm_args.lm)
    lm.init_weights(seed=11)
    vision = get_model_spec(vlm_args.vision_model).model_cls(vlm_args.vision)
    vision.init_weights(seed=12)
    save_model(lm, tmp_path / "lm", "llama", vlm_args.lm)
    save_model(vision, tmp_path / "vision", vlm_args.vision_model, vlm_args.vision)
    subprocess.run([sys.executable, "-m", "converters.combine", "--lm", str(tmp_path / "lm"), "--vision",
                    str(tmp_path / "vision"), "--flavor", "debug_vlm", "--output", str(tmp_path / "vlm")],
                   cwd=REPO, env=run_env(), check=True, capture_output=True)
    run_training(1, tmp_path / "run", COMMON + ["--training.steps=1", "--training.local_batch_size=4",
                                                f"--checkpoint.initial_load_path={tmp_path / 'vlm'}",
                                                "--model.name=vlm", "--model.flavor=debug_vlm",
                                                "--training.dataset=mock"])
    model = titanmm.load(tmp_path / "vlm")
    size = vlm_args.image.tile_size
    data = StepBatcher(MockMultimodalDataset(vlm_args.lm.vocab_size, 96, vlm_args.image_token_id,
                                             model.tokens_per_tile(size, size), size,
                                             bos_id=vlm_args.lm.bos_token_id, seed=42), 4, shuffle=False)
    (batch,) = data.microbatches(0)
    with torch.no_grad():
        logits = model(batch["input_ids"], pixel_values=batch["pixel_values"].flatten(0, 1),
                       position_ids=batch["position_ids"])
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100).item()
    assert abs(logged(tmp_path / "run")[1] - expected) <= 1e-5 * expected
