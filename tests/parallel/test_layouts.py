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
    # with the gradient norm from FSDP2's reduce-scatter (and all-reduce) hooks: squares summed over shard dimensions
    "hsdp2x2": (4, ["--training.local_batch_size=2", "--parallelism.data_parallel_replicate_degree=2",
                    "--training.grad_norm_in_backward=true"]),
    "fsdp2_tp2": (4, ["--training.local_batch_size=4", "--parallelism.tensor_parallel_degree=2",
                      "--training.grad_norm_in_backward=true"]),
    # the gradient norm from FSDP2's reduce-scatter hooks, over 2 accumulated micro-batches of 2; the compiled
    # optimizer updating the token embedding and first block first, then starting their next all-gathers
    "fsdp2_step_edges": (2, ["--training.local_batch_size=2", "--training.grad_norm_in_backward=true",
                             "--optimizer.implementation=compiled", "--parallelism.fsdp_gather_during_optimizer=true"]),
    "fsdp2_full_ac": (2, ["--training.local_batch_size=4", "--activation_checkpoint.mode=full"]),
    "fsdp2_selective_ac": (2, ["--training.local_batch_size=4", "--activation_checkpoint.mode=selective"]),
    # every matmul output kept, and the output layer returning the loss in chunks of 96 of the 512 tokens
    "fsdp2_all_matmuls_ac_loss_chunks": (2, ["--training.local_batch_size=4", "--activation_checkpoint.mode=selective",
                                             "--activation_checkpoint.selective_ac_option=op_all_matmuls",
                                             "--training.loss_chunk_tokens=96"]),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process run's losses and gradient norms."""
    folder = tmp_path_factory.mktemp("single")
    run_training(1, folder, COMMON + ["--training.local_batch_size=4"])  # 2 micro-batches of 4
    losses = logged(folder)
    assert len(losses) == STEPS
    return losses, logged(folder, "grad_norm")


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_single_process(layout, reference, tmp_path):
    reference_losses, reference_norms = reference
    nproc, overrides = LAYOUTS[layout]
    proc = run_training(nproc, tmp_path, COMMON + overrides)
    if "--training.grad_norm_in_backward=true" in overrides:  # the hooks computed every step's norm
        assert "the gradient norm is computed after backward" not in proc.stdout + proc.stderr
        assert "computing the norm after backward" not in proc.stdout + proc.stderr
    losses = logged(tmp_path)
    norms = logged(tmp_path, "grad_norm")
    for step, ref in reference_losses.items():
        assert abs(losses[step] - ref) <= 1e-5 * abs(ref), (layout, step, losses[step], ref)
        assert abs(norms[step] - reference_norms[step]) <= 1e-4 * reference_norms[step], (layout, step)
    # The run really trained: the loss moved.
    assert losses[STEPS] < losses[1]
