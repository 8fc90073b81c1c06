"""Pipeline parallelism on 2 GPUs (NCCL, bf16 FSDP2 mixed precision, FlexAttention document masks,
compiled blocks) follows the 1-GPU run."""

import pytest
import torch

from tests.utils import REPO, logged, run_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

STEPS = 30
COMMON = [f"--training.steps={STEPS}", "--training.seq_len=512", "--training.global_batch_size=8",
          "--training.local_batch_size=8", "--lr_scheduler.warmup_steps=5", "--metrics.log_freq=1"]
PP2 = ["--parallelism.pipeline_parallel_degree=2"]
LAYOUTS = {
    "1F1B_compile": PP2 + ["--compile.enable=true"],
    "Interleaved1F1B_compile_ac": PP2 + ["--compile.enable=true", "--activation_checkpoint.mode=full",
                                         "--parallelism.pipeline_parallel_schedule=Interleaved1F1B"],
    "ZBVZeroBubble": PP2 + ["--parallelism.pipeline_parallel_schedule=ZBVZeroBubble"],
}


def _close(run, reference, tolerance: float = 0.02) -> None:
    for step in (1, 10, STEPS):
        assert abs(run[step] - reference[step]) <= tolerance * reference[step], (step, run[step], reference[step])


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory):
    folder = tmp_path_factory.mktemp("one_gpu")
    run_training(1, folder, COMMON + ["--compile.enable=true"])
    return logged(folder)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_pipeline_follows_one_gpu(layout, one_gpu, tmp_path):
    run_training(2, tmp_path, COMMON + LAYOUTS[layout])
    losses = logged(tmp_path)
    print(f"{layout}: loss {losses[1]:.4f} -> {losses[STEPS]:.4f} (1 GPU {one_gpu[1]:.4f} -> {one_gpu[STEPS]:.4f})")
    assert losses[STEPS] < losses[1]
    _close(losses, one_gpu)


def test_vlm_pipeline_follows_one_gpu(tmp_path):
    config = REPO / "train_configs" / "debug_vlm.toml"
    common = ["--training.steps=20", "--training.seq_len=256", "--training.global_batch_size=8",
              "--training.local_batch_size=8", "--lr_scheduler.warmup_steps=5", "--metrics.log_freq=1",
              "--compile.enable=true"]
    run_training(1, tmp_path / "one", common, config=config)
    run_training(2, tmp_path / "pp2", common + PP2, config=config)
    one, pp2 = logged(tmp_path / "one"), logged(tmp_path / "pp2")
    for step in (1, 10, 20):
        assert abs(pp2[step] - one[step]) <= 0.02 * one[step], (step, pp2[step], one[step])
