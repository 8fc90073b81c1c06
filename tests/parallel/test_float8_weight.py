"""The FP8 all-gather weight with the fused cast (titanmm.parallel.float8_weight): the same bits as torchao's,
its own type through FSDP2's sharding operations, no host read of its scale, and chosen by the conversion.
(FSDP2 x 2 with it against one process: tests/parallel/test_float8.py.)"""

import pytest
import torch
from torch import nn

pytest.importorskip("torchao.float8")

from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor  # noqa: E402

from titanmm.config.job_config import Float8  # noqa: E402
from titanmm.parallel import float8_weight  # noqa: E402
from titanmm.parallel.float8 import convert_to_float8  # noqa: E402
from titanmm.parallel.float8_weight import Float8AllGatherWeight, use_fused_float8_cast  # noqa: E402


def _converted(**float8) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48))
    convert_to_float8(model, Float8(enable=True, emulate=True, filter_fqns=[],
                                    **{"fused_all_gather_cast": True, **float8}))
    return model


def test_conversion_wraps_the_all_gather_weights():
    model = _converted()
    assert all(type(m.weight) is Float8AllGatherWeight for m in (model[0], model[2]))
    assert isinstance(model[0].weight, WeightWithDynamicFloat8CastTensor)  # torchao's scale precompute finds it
    assert model[0].weight.requires_grad
    for off in ({"fused_all_gather_cast": False}, {"precompute_float8_dynamic_scale_for_fsdp": False}):
        assert type(_converted(**off)[0].weight) is WeightWithDynamicFloat8CastTensor, off
    assert type(_converted(enable_fsdp_float8_all_gather=False)[0].weight) is nn.Parameter


def test_type_kept_through_sharding_operations():
    weight = _converted()[0].weight
    for result in (weight.detach(), torch.empty_like(weight), weight.view(-1), weight.clone(),
                   *torch.chunk(weight, 2), nn.Parameter(weight)):
        assert type(result) is Float8AllGatherWeight, result
    meta = _converted()
    meta.to("meta").to_empty(device="cpu")
    assert type(meta[0].weight) is Float8AllGatherWeight


@pytest.mark.parametrize("float8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_pre_all_gather_cast_has_torchaos_bits(monkeypatch, float8_dtype):
    """With a precomputed scale: the compiled kernel's float8 bits and scale equal torchao's eager cast, values
    beyond the float8 range (saturated) included."""
    calls = []
    compiled = float8_weight._compiled_scale_and_cast
    monkeypatch.setattr(float8_weight, "_compiled_scale_and_cast", lambda *a: calls.append(1) or compiled(*a))
    weight = _converted()[0].weight
    values = torch.randn(64, 32) * 3
    values[0, :4] = torch.tensor([1e6, -1e6, 0.0, 1e-30])
    scale = torch.tensor(torch.finfo(float8_dtype).max / 4.0)
    ours = Float8AllGatherWeight(values, weight._linear_mm_config, float8_dtype, scale)
    theirs = WeightWithDynamicFloat8CastTensor(values, weight._linear_mm_config, float8_dtype, scale)
    (bits,), (our_scale,) = ours.fsdp_pre_all_gather(None)
    (expected,), (their_scale,) = theirs.fsdp_pre_all_gather(None)
    assert calls and bits.dtype == float8_dtype and bits.shape == values.shape
    assert torch.equal(bits.view(torch.uint8), expected.view(torch.uint8))
    assert our_scale is scale and torch.equal(their_scale, scale)


def test_flatten_does_not_read_the_scale():
    """torchao's __tensor_flatten__ asks `if scale:` (a GPU synchronisation; an error on the meta device)."""
    weight = _converted()[0].weight
    scale = torch.tensor(2.0, device="meta")
    names, _ = Float8AllGatherWeight(weight._tensor, weight._linear_mm_config, weight._dtype,
                                     scale).__tensor_flatten__()
    assert names == ["_tensor", "_precomputed_scale"]
    with pytest.raises(Exception):
        WeightWithDynamicFloat8CastTensor(weight._tensor, weight._linear_mm_config, weight._dtype,
                                          scale).__tensor_flatten__()


def test_rewrap_is_idempotent():
    model = _converted()
    assert use_fused_float8_cast(model) == 0
