"""titanmm.parallel.grad_norm: the gradient norm from FSDP2's reduce-scatter hooks equals the one computed after
backward (gradient accumulation included) and falls back when a gradient did not come from FSDP2. (Training
with it against one process under FSDP2, HSDP and FSDP2 + TP: tests/parallel/test_layouts.py.)"""

import dataclasses

import torch
from torch import nn

from tests.utils import free_port, gloo_process_group
from titanmm.parallel.grad_norm import BackwardGradNorm


def _worker(rank: int, world_size: int, port: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from titanmm.models.llama import LLAMA_FLAVORS, Transformer
    from titanmm.optim import clip_grad_norm_
    from titanmm.parallel.fsdp import apply_fsdp

    with gloo_process_group(rank, world_size, port):
        args = dataclasses.replace(LLAMA_FLAVORS["debug"], n_layers=2, vocab_size=251)  # 251: padded shards
        torch.manual_seed(0)
        model = Transformer(args)
        apply_fsdp(model, [model.layers], init_device_mesh("cpu", (world_size,)), "float32", "float32", lm=model)
        params = list(model.parameters())
        norm = BackwardGradNorm(params)
        generator = torch.Generator().manual_seed(rank)
        for micro_batches in (1, 2, 1):  # the middle step accumulates two micro-batches
            for _ in range(micro_batches):
                tokens = torch.randint(0, args.vocab_size, (2, 16), generator=generator)
                model(tokens).float().logsumexp(-1).mean().backward()
            with_grads = [p for p in params if p.grad is not None]
            ours, reference = norm.total(with_grads), clip_grad_norm_(with_grads, 0.0)
            assert ours is not None and torch.allclose(ours, reference, rtol=1e-6, atol=0), (ours, reference)
            assert not norm.fired and not norm.norms.any()  # ready for the next step
            model.zero_grad(set_to_none=True)
        # gradients set some other way: no hook fired, the caller computes the norm after backward
        for p in params:
            p.grad = torch.ones_like(p)
        assert norm.total(params) is None
        norm.remove()
        from torch.distributed.tensor import DTensor, Partial, Replicate

        replicated = nn.Parameter(DTensor.from_local(torch.ones(2), params[0].device_mesh, [Replicate()]))
        partial = nn.Parameter(DTensor.from_local(torch.ones(2), params[0].device_mesh, [Partial()]))
        assert BackwardGradNorm.supports(params + [replicated]) and not BackwardGradNorm.supports(params + [partial])


def test_norm_from_reduce_scatter_hooks_equals_the_norm_after_backward():
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)


def test_supports_fsdp2_alone():
    assert not BackwardGradNorm.supports([])
    assert not BackwardGradNorm.supports([nn.Parameter(torch.ones(2))])  # not a DTensor: no FSDP2
