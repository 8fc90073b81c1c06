"""The output layer computing the loss chunk by chunk (titanmm.models.lm_head) against logits + cross_entropy:
the same loss and gradients, in float64 to rounding, in bf16 and under autocast to bf16 rounding."""

import pytest
import torch
import torch.nn.functional as F

from titanmm.models.llama import LLAMA_FLAVORS, Transformer
from titanmm.models.lm_head import IGNORE_INDEX, LMHead, cross_entropy_sum_and_grad, linear_cross_entropy_sum


def _problem(dtype, tokens=37, dim=16, vocab=50):
    torch.manual_seed(0)
    h = torch.randn(tokens, dim, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, dim, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))
    labels[::5] = IGNORE_INDEX
    return h, w, labels


def _grads(loss_fn, h, w):
    h.grad = w.grad = None
    loss = loss_fn()
    (3.0 * loss).backward()  # a scaled loss, as the trainer's
    return loss.detach(), h.grad.clone(), w.grad.clone()


def _reference(h, w, labels):
    return F.cross_entropy((h @ w.t()).float() if h.dtype != torch.float64 else h @ w.t(), labels,
                           ignore_index=IGNORE_INDEX, reduction="sum")


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_chunked_loss_and_gradients_equal_the_logits_path_float64(chunk):
    h, w, labels = _problem(torch.float64)
    ref = _grads(lambda: _reference(h, w, labels), h, w)
    out = _grads(lambda: linear_cross_entropy_sum(h, w, labels, chunk), h, w)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bf16_weights_and_autocast_to_bf16_rounding():
    h, w, labels = _problem(torch.float32, tokens=64, dim=32, vocab=100)
    with torch.autocast("cpu", torch.bfloat16):  # float32 weights, bf16 matmuls: the one-GPU layout
        ref = _grads(lambda: _reference(h, w, labels), h, w)
        out = _grads(lambda: linear_cross_entropy_sum(h, w, labels, 16), h, w)
    assert out[2].dtype == torch.float32
    for a, b in zip(out, ref):
        assert ((a - b).norm() / b.norm()).item() < 1e-2
    hb, wb = h.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()  # FSDP2's bf16 layout
    ref = _grads(lambda: _reference(hb, wb, labels), hb, wb)
    out = _grads(lambda: linear_cross_entropy_sum(hb, wb, labels, 16), hb, wb)
    assert out[1].dtype == out[2].dtype == torch.bfloat16
    for a, b in zip(out, ref):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


def test_frozen_head_skips_the_weight_gradient():
    h, w, labels = _problem(torch.float64)
    w.requires_grad_(False)
    h.grad = None
    linear_cross_entropy_sum(h, w, labels, 8).backward()
    reference = h.detach().clone().requires_grad_()
    _reference(reference, w, labels).backward()
    torch.testing.assert_close(h.grad, reference.grad, rtol=1e-12, atol=1e-12)
    assert w.grad is None


def test_all_labels_ignored_gives_zero_loss_and_gradients():
    h, w, labels = _problem(torch.float64)
    loss, grad_h, grad_w = _grads(lambda: linear_cross_entropy_sum(h, w, torch.full_like(labels, IGNORE_INDEX), 8),
                                  h, w)
    assert loss.item() == 0.0 and not grad_h.any() and not grad_w.any()


def test_chunk_function_alone_and_compiled():
    logits = torch.randn(9, 40)
    labels = torch.randint(0, 40, (9,))
    labels[3] = IGNORE_INDEX
    x = logits.clone().requires_grad_()
    ref = F.cross_entropy(x, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    ref.backward()
    loss, grad = cross_entropy_sum_and_grad(logits.clone(), labels)
    torch.testing.assert_close(loss, ref.detach())
    torch.testing.assert_close(grad, x.grad)
    compiled_loss, compiled_grad = torch.compile(cross_entropy_sum_and_grad)(logits.clone(), labels)
    torch.testing.assert_close(compiled_loss, ref.detach())
    torch.testing.assert_close(compiled_grad, x.grad)


def test_backward_runs_once_and_bad_chunk_is_refused():
    h, w, labels = _problem(torch.float64)
    loss = linear_cross_entropy_sum(h, w, labels, 8)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()
    with pytest.raises(ValueError, match="chunk_tokens = 0"):
        linear_cross_entropy_sum(h, w, labels, 0)


def test_transformer_with_labels_returns_the_summed_loss_of_its_logits():
    torch.manual_seed(0)
    model = Transformer(LLAMA_FLAVORS["debug"])
    model.init_weights()
    model.double()
    assert isinstance(model.output, LMHead) and "output.weight" in model.state_dict()
    model.output.loss_chunk_tokens = 10
    tokens = torch.randint(0, model.args.vocab_size, (2, 24))
    labels = torch.roll(tokens, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    params = list(model.parameters())
    ref_loss = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="sum")
    ref_grads = torch.autograd.grad(ref_loss, params)
    loss = model(tokens, labels=labels)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
