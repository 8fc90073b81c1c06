"""End-to-end training runs: resume, layout changes, config errors, NaN handling, preemption, launch."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.utils import REPO, logged, run_env, run_training, train_command
from titanmm.config import load_config
from titanmm.config.loader import ConfigError
from titanmm.train import NonFiniteError, Trainer, main

SHORT = ["--training.seq_len=128", "--training.global_batch_size=8", "--lr_scheduler.warmup_steps=2"]


def _ckpt(interval: int) -> list[str]:
    return ["--checkpoint.enable=true", f"--checkpoint.interval={interval}"]


def _resume_from_step3(full, part):
    """A run folder whose checkpoint folder holds only the uninterrupted run's step-3 checkpoint."""
    (part / "checkpoint").mkdir(parents=True)
    shutil.copytree(full / "checkpoint" / "step-3", part / "checkpoint" / "step-3")


@pytest.mark.slow
def test_resume_is_bitwise_exact(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = SHORT + ["--training.local_batch_size=8", "--training.steps=6"] + _ckpt(3)
    run_training(1, full, common)
    _resume_from_step3(full, part)
    run_training(1, part, common)
    expected, resumed = logged(full), logged(part)
    assert sorted(resumed) == [4, 5, 6]
    for step in range(4, 7):
        assert resumed[step] == expected[step], (step, resumed[step], expected[step])
    assert logged(part, "lr")[6] == logged(full, "lr")[6]
    assert logged(part, "grad_norm")[6] == logged(full, "grad_norm")[6]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tp2", "single", "hsdp2x2"])
def test_resume_on_another_layout(tmp_path, target):
    """Save on FSDP over 2 ranks, resume on another layout: the next losses follow the uninterrupted run."""
    full, part = tmp_path / "full", tmp_path / "part"
    common = SHORT + ["--training.steps=6"] + _ckpt(3)
    run_training(2, full, common + ["--training.local_batch_size=4"])
    _resume_from_step3(full, part)
    layouts = {"tp2": (2, ["--training.local_batch_size=8", "--parallelism.tensor_parallel_degree=2"]),
               "single": (1, ["--training.local_batch_size=4"]),
               "hsdp2x2": (4, ["--training.local_batch_size=2", "--parallelism.data_parallel_replicate_degree=2"])}
    nproc, overrides = layouts[target]
    run_training(nproc, part, common + overrides)
    expected, resumed = logged(full), logged(part)
    for step in range(4, 7):
        assert abs(resumed[step] - expected[step]) <= 1e-5 * expected[step], (step, resumed[step], expected[step])


@pytest.mark.slow
def test_two_node_launch(tmp_path):
    """torchrun --nnodes=2 with a c10d rendezvous on localhost: two 'nodes' of one process each."""
    from tests.utils import free_port

    port = free_port()
    procs = []
    for node in range(2):
        cmd = train_command(1, tmp_path, SHORT + ["--training.local_batch_size=4", "--training.steps=3"])
        cmd = [c for c in cmd if c != "--standalone"]
        cmd[3:3] = ["--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=twonode",
                    "--max_restarts=0"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    losses = logged(tmp_path)
    assert sorted(losses) == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    cmd = train_command(1, tmp_path, SHORT + ["--training.local_batch_size=8", "--training.steps=1000"]
                        + _ckpt(1000))
    # The trainer itself gets the signal, as from Slurm or Kubernetes (torchrun's agent would
    # forward it too, but then reports its own exit as a failure).
    cmd = [sys.executable] + cmd[cmd.index("-m", 2):]
    proc = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoint").iterdir() if p.name.startswith("step-"))
    assert steps and steps[-1] >= 2 and steps[-1] < 1000, steps
    assert "preemption" in out


@pytest.mark.parametrize("overrides, message", [
    (["--training.stepz=3"], "unknown key training.stepz"),
    (["--training.steps=three"], "training.steps: expected an integer"),
    (["--parallelism.tensor_parallel_degree=3"], "world size 1 is not divisible"),
    (["--parallelism.pipeline_parallel_degree=2"], "pipeline_parallel_degree * context_parallel_degree = 2"),
    (["--parallelism.context_parallel_degree=2"], "parallelism.context_parallel_degree = 2"),
    (["--model.flavor=llama9_1t"], "model.flavor = 'llama9_1t'"),
    (["--training.seq_len=4096"], "training.seq_len = 4096 exceeds"),
    (["--training.global_batch_size=12"], "training.global_batch_size = 12"),
    (["--activation_checkpoint.mode=most"], "activation_checkpoint.mode = 'most'"),
    (["--activation_checkpoint.mode=memory_budget"], "activation_checkpoint.mode = 'memory_budget' needs compile"),
    (["--activation_checkpoint.all_matmuls_blocks=-2"], "activation_checkpoint.all_matmuls_blocks = -2"),
    (["--activation_checkpoint.mode=memory_budget", "--compile.enable=true", "--activation_checkpoint.memory_budget=2"],
     "activation_checkpoint.memory_budget = 2.0"),
    (["--model.name=vlm", "--model.flavor=debug_vlm"], "training.dataset = 'shipped' does not exist"),
    (["--model.name=clip"], "model.name = 'clip'"),
])
def test_config_errors_name_the_key(overrides, message, capsys):
    assert main(["--config", str(REPO / "train_configs" / "debug_llama.toml"), *overrides]) == 2
    assert message in capsys.readouterr().err


def test_compiled_optimizer_trains_like_the_fused_one(tmp_path):
    """optimizer.implementation = compiled: the same losses as torch's fused AdamW (float32, one process)."""
    for impl in ("fused", "compiled"):
        run_training(1, tmp_path / impl, SHORT + ["--training.steps=3", f"--optimizer.implementation={impl}"])
    reference, losses = logged(tmp_path / "fused"), logged(tmp_path / "compiled")
    assert sorted(losses) == [1, 2, 3]
    for step, ref in reference.items():
        assert abs(losses[step] - ref) <= 1e-5 * ref, (step, losses[step], ref)


@pytest.mark.parametrize("overrides, world_size, message", [
    (["--training.loss_chunk_tokens=-1"], 1, "training.loss_chunk_tokens = -1 must be >= 0"),
    (["--training.loss_chunk_tokens=64", "--parallelism.tensor_parallel_degree=2"], 2,
     "does not go with parallelism.tensor_parallel_degree = 2"),
    (["--training.loss_chunk_tokens=64", "--parallelism.pipeline_parallel_degree=2"], 2,
     "does not go with parallelism.pipeline_parallel_degree = 2"),
    (["--training.loss_chunk_tokens=64", "--float8.enable=true", "--float8.filter_fqns=patch_embed"], 1,
     "an FP8 output layer"),
])
def test_loss_chunks_refuse_what_needs_the_logits(overrides, world_size, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(REPO / "train_configs" / "debug_llama.toml"), overrides, world_size=world_size)


def test_config_degree_checks_against_world_size():
    with pytest.raises(ValueError, match="training.seq_len = 130 must be divisible"):
        load_config(str(REPO / "train_configs" / "debug_llama.toml"),
                    ["--parallelism.tensor_parallel_degree=4", "--training.seq_len=130"], world_size=4)
    with pytest.raises(ValueError, match="does not divide n_heads=8 and n_kv_heads=4"):
        load_config(str(REPO / "train_configs" / "debug_llama.toml"),
                    ["--parallelism.tensor_parallel_degree=8"], world_size=8)


def test_malformed_toml(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training\nsteps = 3\n")
    assert main(["--config", str(bad)]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


def test_print_config(capsys):
    assert main(["--config", str(REPO / "train_configs" / "debug_llama.toml"), "--print-config",
                 "--training.steps=7"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["steps"] == 7


def test_host_reads_steps_only_when_logging(tmp_path, in_process, monkeypatch):
    """Between logged steps the trainer never reads a loss: a streak of non-finite steps is found at the next
    logged step (the weights were left alone on the device meanwhile), and train() still returns every loss."""
    def trainer_in(folder):
        return Trainer(load_config(str(REPO / "train_configs" / "debug_llama.toml"), [
            f"--job.dump_folder={folder}", "--training.steps=8", "--training.seq_len=64",
            "--training.local_batch_size=2", "--training.max_consecutive_nonfinite=3", "--metrics.log_freq=5",
            "--metrics.enable_tensorboard=false", "--metrics.plot_loss=false"]))

    trainer, settled_at = trainer_in(tmp_path / "good"), []
    settle = trainer.settle_steps
    monkeypatch.setattr(trainer, "settle_steps", lambda: (settled_at.append(trainer.train_state.step), settle())[1])
    losses = trainer.train()
    assert settled_at == [1, 5, 8] and len(losses) == 8 and all(math.isfinite(x) for x in losses)

    trainer = trainer_in(tmp_path / "bad")
    forward = trainer._forward_loss_sum
    monkeypatch.setattr(trainer, "_forward_loss_sum", lambda batch: forward(batch) * (
        float("nan") if trainer.train_state.step + 1 in (2, 3, 4) else 1.0))
    with pytest.raises(NonFiniteError, match="3 consecutive steps .* the last at step 4"):
        trainer.train()
    assert trainer.train_state.step == 5 and trainer.train_state.total_nonfinite_skips == 3


def test_data_wait_is_the_share_of_the_window_spent_fetching_batches(tmp_path, in_process, monkeypatch):
    trainer = Trainer(load_config(str(REPO / "train_configs" / "debug_llama.toml"), [
        f"--job.dump_folder={tmp_path}", "--training.steps=6", "--training.seq_len=64",
        "--training.local_batch_size=2", "--metrics.log_freq=3", "--metrics.enable_tensorboard=false",
        "--metrics.plot_loss=false"]))
    fetch = trainer.data.microbatches

    def slow_fetch(step):
        if step >= 3:  # the second window: a loader that takes 0.3 s per batch
            time.sleep(0.3)
        return fetch(step)

    monkeypatch.setattr(trainer.data, "microbatches", slow_fetch)
    trainer.train()
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    window = records[6]["time"] - records[3]["time"]
    assert records[3]["data_wait_pct"] < 50
    assert records[6]["data_wait_pct"] == pytest.approx(100 * 0.9 / window, abs=10)


@pytest.mark.parametrize("implementation", ["fused", "foreach"])  # skipped on the device / by the host
def test_nonfinite_steps_are_skipped_then_stop(tmp_path, in_process, monkeypatch, implementation):
    config = load_config(str(REPO / "train_configs" / "debug_llama.toml"), [
        f"--job.dump_folder={tmp_path}", "--training.steps=10", "--training.seq_len=64",
        f"--optimizer.implementation={implementation}",
        "--training.local_batch_size=2", "--training.max_consecutive_nonfinite=3", "--metrics.log_freq=1",
        "--metrics.enable_tensorboard=false", "--metrics.plot_loss=false", *_ckpt(2)])
    trainer = Trainer(config)
    real_forward = trainer._forward_loss_sum
    poisoned_steps = {3, 5, 6, 7}  # 1-based: one isolated bad step, then three in a row

    def forward(batch):
        loss = real_forward(batch)
        return loss * float("nan") if trainer.train_state.step + 1 in poisoned_steps else loss

    monkeypatch.setattr(trainer, "_forward_loss_sum", forward)
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        trainer.train()
    assert trainer.train_state.total_nonfinite_skips == 4
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert records[2]["skipped_steps"] == 0 and records[3]["skipped_steps"] == 1 and records[6]["skipped_steps"] == 3
    assert 7 not in records
    # Skipped steps leave the weights alone, and the checkpoints written around them are good.
    from titanmm.checkpoint.format import list_steps, load

    assert list_steps(tmp_path / "checkpoint") == [4, 6]  # keep_latest_k = 2
    step4 = load(tmp_path / "checkpoint", step=4).state_dict()
    step6 = load(tmp_path / "checkpoint", step=6).state_dict()
    for name, value in step4.items():
        assert torch.isfinite(value).all() and torch.equal(value, step6[name]), name


def test_memory_budget_checkpointing_trains_like_none(tmp_path, in_process):
    """Compiled blocks under a zero activation budget (recompute all the partitioner can) train like plain
    uncheckpointed blocks; the budget reaches the compiler."""
    import torch._functorch.config as functorch_config

    def losses(folder, overrides):
        return Trainer(load_config(str(REPO / "train_configs" / "debug_llama.toml"), [
            f"--job.dump_folder={folder}", "--training.steps=3", "--training.seq_len=32",
            "--training.local_batch_size=2", "--metrics.enable_tensorboard=false", "--metrics.plot_loss=false",
            *overrides])).train()

    reference = losses(tmp_path / "none", [])
    try:
        budgeted = losses(tmp_path / "budget", ["--compile.enable=true", "--activation_checkpoint.mode=memory_budget",
                                               "--activation_checkpoint.memory_budget=0.0"])
        assert functorch_config.activation_memory_budget == 0.0
    finally:
        functorch_config.activation_memory_budget = 1.0
    assert budgeted == pytest.approx(reference, rel=1e-4)
