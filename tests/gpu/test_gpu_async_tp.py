"""Async tensor parallelism on 2 GPUs: compiled TP 2 with micro-pipelined collectives trains like plain TP 2."""

import pytest
import torch

from tests.utils import logged, run_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]


def test_async_tp_matches_tp(tmp_path):
    common = ["--config=train_configs/llama3_8b.toml", "--model.n_layers=2", "--training.steps=10",
              "--training.seq_len=4096", "--training.local_batch_size=2", "--training.dataset=shipped",
              "--lr_scheduler.warmup_steps=3", "--checkpoint.enable=false", "--compile.enable=true",
              "--parallelism.tensor_parallel_degree=2", "--metrics.log_freq=1"]
    run_training(2, tmp_path / "tp", common)
    run_training(2, tmp_path / "async_tp", common + ["--compile.enable_async_tensor_parallel=true"])
    tp, async_tp = logged(tmp_path / "tp"), logged(tmp_path / "async_tp")
    for step in (1, 5, 10):
        assert abs(async_tp[step] - tp[step]) <= 0.01 * tp[step], (step, async_tp[step], tp[step])
