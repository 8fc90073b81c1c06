"""Training losses on every parallel layout equal the single-process run (float32, CPU, gloo)."""

import pytest

from tests.utils import logged, run_training

STEPS = 4
COMMON = [f"--training.steps={STEPS}", "--training.seq_len=128", "--training.global_batch_size=8",
          "--lr_scheduler.warmup_steps=2"]

LAYOUTS = {
    # name: (processes, overrides)
    "fsdp2": (2, ["--training.local_batch_size=4"]),
    "tp2": (2, ["--training.local_batch_size=4", "--parallelism.tensor_parallel_degree=2"]),
    "tp2_no_loss_parallel": (2, ["--training.local_batch_size=4", "--parallelism.tensor_parallel_degree=2",
                                 "--parallelism.enable_loss_parallel=false"]),
    "hsdp2x2": (4, ["--training.local_batch_size=2", "--parallelism.data_parallel_replicate_degree=2"]),
    "fsdp2_tp2": (4, ["--training.local_batch_size=4", "--parallelism.tensor_parallel_degree=2"]),
    "fsdp2_full_ac": (2, ["--training.local_batch_size=4", "--activation_checkpoint.mode=full"]),
    "fsdp2_selective_ac": (2, ["--training.local_batch_size=4", "--activation_checkpoint.mode=selective"]),
    # every matmul output kept, and the output layer returning the loss in chunks of 96 of the 512 tokens
    "fsdp2_all_matmuls_ac_loss_chunks": (2, ["--training.local_batch_size=4", "--activation_checkpoint.mode=selective",
                                             "--activation_checkpoint.selective_ac_option=op_all_matmuls",
                                             "--training.loss_chunk_tokens=96"]),
}


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    run_training(1, folder, COMMON + ["--training.local_batch_size=4"])  # 2 micro-batches of 4
    losses = logged(folder)
    assert len(losses) == STEPS
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, reference_losses, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    run_training(nproc, tmp_path, COMMON + overrides)
    losses = logged(tmp_path)
    for step, ref in reference_losses.items():
        assert abs(losses[step] - ref) <= 1e-5 * abs(ref), (layout, step, losses[step], ref)
    # The run really trained: the loss moved.
    assert losses[STEPS] < losses[1]
