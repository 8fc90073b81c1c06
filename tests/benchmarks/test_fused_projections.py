"""benchmarks/fused_projections.py: both variants compute the same gradients (CPU, float64)."""

import torch

from benchmarks.fused_projections import fused, separate


def test_fused_and_separate_projections_have_the_same_gradients():
    torch.manual_seed(0)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    weights = [torch.randn(n, 8, dtype=torch.float64, requires_grad=True) for n in (8, 2, 2)]
    grads_out = [torch.randn(6, n, dtype=torch.float64) for n in (8, 2, 2)]
    results = []
    for fn in (separate, fused):
        x.grad = None
        for w in weights:
            w.grad = None
        fn(x, weights, grads_out)
        results.append([x.grad.clone()] + [w.grad.clone() for w in weights])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
