"""titanmm.parallel.grad_copy_in on CUDA: FSDP2's copy-in through the registered kernel gives torch._chunk_cat's bytes."""

import pytest
import torch

from tests.parallel.test_grad_copy_in import SHAPES
from titanmm.parallel import grad_copy_in

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_registered_copy_in_equals_chunk_cat_on_gpu(world, out_dtype):
    import torch.distributed.fsdp._fully_shard._fsdp_collectives  # noqa: F401  (defines fsdp::chunk_cat)

    grad_copy_in.register()
    try:
        for shapes in SHAPES.values():
            tensors = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes]
            numel = sum(-(-s[0] // world) * world * (torch.Size(s).numel() // s[0]) for s in shapes)
            expected = torch.full((world, numel // world), float("nan"), device="cuda", dtype=out_dtype)
            ours = expected.clone()
            torch._chunk_cat(tensors, 0, world, out=expected)
            torch.ops.fsdp.chunk_cat(tensors, 0, world, out=ours)  # FSDP2's call, now titanmm's kernel
            assert torch.equal(expected, ours)
    finally:
        grad_copy_in.unregister()
