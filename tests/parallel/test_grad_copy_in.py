"""titanmm.parallel.grad_copy_in: FSDP2's reduce-scatter copy-in, one strided copy per gradient, gives the bytes of
torch._chunk_cat (CPU tensors; the GPU test repeats it on CUDA)."""

import pytest
import torch

from titanmm.parallel import grad_copy_in
from titanmm.parallel.grad_copy_in import chunk_cat_per_parameter

SHAPES = {  # dim-0 sizes divisible by the world size, and not (padded), 1-D (norm weights) and single rows
    "block": [(64, 32), (16, 32), (16, 32), (64, 64), (96, 64), (64, 96), (32,)],
    "padded": [(5, 3), (7,), (1, 4), (9, 2, 3)],
    "single_rows": [(1, 8), (2,), (3, 5)],
}


def expected_and_ours(shapes, world, dtype_in, dtype_out):
    torch.manual_seed(0)
    tensors = [torch.randn(s).to(dtype_in) for s in shapes]
    numel = sum(-(-s[0] // world) * world * (torch.Size(s).numel() // s[0]) for s in shapes)
    expected = torch.full((world, numel // world), float("nan"), dtype=dtype_out)
    ours = expected.clone()
    torch._chunk_cat(tensors, 0, world, out=expected)
    chunk_cat_per_parameter(tensors, 0, world, out=ours)
    return expected, ours


@pytest.mark.parametrize("shapes", sorted(SHAPES))
@pytest.mark.parametrize("world", [1, 2, 4, 8])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                    (torch.bfloat16, torch.bfloat16)])
def test_per_parameter_copy_in_equals_chunk_cat(shapes, world, dtypes):
    expected, ours = expected_and_ours(SHAPES[shapes], world, *dtypes)
    assert torch.equal(expected, ours)  # padding zeroed: no NaN left from the prefill


def test_wrong_output_size_is_an_error():
    out = torch.empty(2, 9)
    with pytest.raises(ValueError, match="fill 8 of the output's 9 columns"):
        chunk_cat_per_parameter([torch.randn(4, 4)], 0, 2, out=out)


def test_register_overrides_the_cuda_kernel_only_until_unregistered():
    import torch.distributed.fsdp._fully_shard._fsdp_collectives  # noqa: F401

    before = torch._C._dispatch_dump("fsdp::chunk_cat")
    grad_copy_in.register()
    try:
        grad_copy_in.register()  # once per process
        table = torch._C._dispatch_dump("fsdp::chunk_cat")
        cuda = [line for line in table.splitlines() if line.startswith("CUDA:")]
        assert len(cuda) == 1 and "grad_copy_in.py" in cuda[0]
        cpu = [line for line in table.splitlines() if line.startswith("CPU:")]
        assert "grad_copy_in.py" not in cpu[0]
    finally:
        grad_copy_in.unregister()
    assert torch._C._dispatch_dump("fsdp::chunk_cat") == before
