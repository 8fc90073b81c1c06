"""Attention kernels on the GPU: cuDNN's scaled_dot_product_attention (`[model] sdpa_backends = ["cudnn",
"flash"]`, the H100 recipes' choice) gives flash attention's outputs and gradients, and the same training."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tests.utils import logged, run_training

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _attention_and_grads(backend, q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(grad_out)
    return [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]


@pytest.mark.parametrize("seq, heads, kv_heads, head_dim", [(8192, 32, 8, 128), (1000, 28, 4, 128), (577, 16, 16, 64)])
def test_cudnn_matches_flash(seq, heads, kv_heads, head_dim):
    """Forward and all three input gradients agree to bf16 rounding (relative to each tensor's scale),
    grouped-query heads and a sequence length that is no multiple of the kernels' tiles included."""
    torch.manual_seed(0)
    q = torch.randn(2, heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, kv_heads, seq, head_dim, device="cuda", dtype=torch.bfloat16)
    grad_out = torch.randn_like(q)
    flash = _attention_and_grads(SDPBackend.FLASH_ATTENTION, q, k, v, grad_out)
    cudnn = _attention_and_grads(SDPBackend.CUDNN_ATTENTION, q, k, v, grad_out)
    for name, a, b in zip(["out", "dq", "dk", "dv"], flash, cudnn):
        rel = (a - b).norm() / a.norm()
        assert rel < 1e-2, (name, rel.item())


def test_training_with_cudnn_attention_matches_flash(tmp_path):
    """30 compiled steps of a small Llama 3 (1B widths, 2 blocks, seq 4096): cuDNN attention's losses follow
    flash attention's within bf16 noise."""
    common = ["--model.flavor=llama3.2_1b", "--model.n_layers=2", "--training.steps=30", "--training.seq_len=4096",
              "--training.local_batch_size=2", "--training.dataset=shipped", "--training.document_masking=false",
              "--lr_scheduler.warmup_steps=5", "--compile.enable=true", "--metrics.log_freq=1"]
    run_training(1, tmp_path / "flash", common + ["--model.sdpa_backends=flash"])
    run_training(1, tmp_path / "cudnn", common + ["--model.sdpa_backends=cudnn,flash"])
    flash, cudnn = logged(tmp_path / "flash"), logged(tmp_path / "cudnn")
    print("losses flash / cudnn:", [(s, round(flash[s], 4), round(cudnn[s], 4)) for s in (1, 10, 20, 30)])
    assert flash[30] < flash[1] - 1.0
    for step in (1, 10, 20, 30):
        assert abs(cudnn[step] - flash[step]) <= 0.01 * flash[step], (step, cudnn[step], flash[step])
