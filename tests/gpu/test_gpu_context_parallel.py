"""Context parallelism on 2 GPUs: ring attention over a split sequence trains like the whole sequence."""

import pytest
import torch

from tests.utils import logged, run_training

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]

STEPS = 20


def _close(cp: dict[int, float], reference: dict[int, float], tolerance: float) -> None:
    for step in range(1, STEPS + 1):
        assert abs(cp[step] - reference[step]) <= tolerance * reference[step], (step, cp[step], reference[step])


@pytest.mark.parametrize("rotate", ["allgather", "alltoall"])
def test_context_parallel_lm_matches_one_gpu(tmp_path, rotate):
    """Llama (8B widths, 2 blocks), seq 8192, bf16: CP 2 losses equal CP 1 within bf16 noise for 20 steps."""
    common = ["--model.n_layers=2", f"--training.steps={STEPS}",
              "--training.seq_len=8192", "--training.local_batch_size=1", "--training.global_batch_size=2",
              "--training.dataset=shipped", "--training.document_masking=false", "--lr_scheduler.warmup_steps=5",
              "--optimizer.lr=3e-4", "--metrics.log_freq=1", "--checkpoint.enable=false"]
    config = ["--config=train_configs/llama3_8b.toml"]  # the last --config wins over tests.utils' debug one
    run_training(1, tmp_path / "cp1", config + common)
    run_training(2, tmp_path / "cp2", config + common + [
        "--training.local_batch_size=2", "--parallelism.context_parallel_degree=2",
        f"--parallelism.context_parallel_rotate_method={rotate}"])
    _close(logged(tmp_path / "cp2"), logged(tmp_path / "cp1"), 0.01)


def test_context_parallel_vlm_matches_one_gpu(tmp_path):
    """A VLM (InternViT-like debug tower, image embeddings merged before the split): CP 2 equals CP 1."""
    common = ["--model.name=vlm", "--model.flavor=debug_vlm_internvit", f"--training.steps={STEPS}",
              "--training.seq_len=512", "--training.local_batch_size=2", "--training.global_batch_size=4",
              "--training.document_masking=false", "--lr_scheduler.warmup_steps=5", "--metrics.log_freq=1"]
    config = ["--config=train_configs/debug_vlm.toml"]
    run_training(1, tmp_path / "cp1", config + common)
    run_training(2, tmp_path / "cp2", config + common + ["--training.local_batch_size=4",
                                                          "--parallelism.context_parallel_degree=2"])
    _close(logged(tmp_path / "cp2"), logged(tmp_path / "cp1"), 0.01)
