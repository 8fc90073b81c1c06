"""titanmm.utils.tensors: the plain tensor inside a wrapper subclass, inside a DTensor too."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from tests.utils import free_port, gloo_process_group
from titanmm.utils.tensors import without_wrapper, wrapped_tensor

float8_fsdp = pytest.importorskip("torchao.float8.fsdp_utils")
from torchao.float8.float8_training_tensor import LinearMMConfig  # noqa: E402


def _wrapper(values: torch.Tensor) -> torch.Tensor:
    return float8_fsdp.WeightWithDynamicFloat8CastTensor(values, LinearMMConfig(), torch.float8_e4m3fn)


def test_plain_tensor_and_wrapper():
    values = torch.randn(4, 6)
    assert wrapped_tensor(values) is values and without_wrapper(values) is values
    assert wrapped_tensor(_wrapper(values)) is values
    assert without_wrapper(_wrapper(values)) is values


def test_dtensor_with_wrapped_local_shares_storage():
    with gloo_process_group(0, 1, free_port()):
        mesh = init_device_mesh("cpu", (1,))
        plain = distribute_tensor(torch.randn(4, 6), mesh, [Shard(0)])
        assert without_wrapper(plain) is plain
        values = plain.to_local().clone()
        wrapped = DTensor.from_local(_wrapper(values), mesh, [Shard(0)], run_check=False)
        unwrapped = without_wrapper(wrapped)
        assert type(unwrapped._local_tensor) is torch.Tensor
        assert unwrapped.shape == wrapped.shape and unwrapped.placements == wrapped.placements
        unwrapped._local_tensor.fill_(3.0)  # a checkpoint load writes through it into the wrapped values
        assert torch.equal(values, torch.full_like(values, 3.0))
