"""The FP8 FSDP2 all-gather weight, with its cast fused into one generated kernel.

Under the tensorwise recipe with `float8.enable_fsdp_float8_all_gather`, torchao wraps every float8 linear's
weight in `WeightWithDynamicFloat8CastTensor`, whose FSDP2 hook casts the local shard to float8 before each
all-gather (forward, and again in backward after the reshard): with the scale precomputed after the optimizer
step, that cast is three eager kernels, `x * scale`, a clamp to the float8 range and the conversion, reading and
writing float32 twice before the one-byte result (21 bytes per parameter). On 2 H200s they took 84 ms of kernel
time per Llama 3 8B FP8 step in titanmm and torchtitan alike (`benchmarks/results/
2026-11-23_h200x2_llama3_8b_fp8_{titanmm,torchtitan}_rank0_kernels.txt`: multiply, clamp_scalar, float8_copy),
on the all-gather stream, contending with the matmuls.

`Float8AllGatherWeight` is that wrapper with the cast compiled into one kernel (read float32, write float8: 5
bytes per parameter), the same values bit for bit: the same float32 multiply, clamp and round-to-nearest-even
conversion. Everything else (the dynamic-scale path when no scale was precomputed, the unwrapping after the
all-gather, torchao's scale precomputation) is torchao's. Unlike the base class it keeps its own type through
the tensor operations FSDP2 applies when sharding (torchao rebuilds the base class) and reads its precomputed
scale without a host synchronisation in `__tensor_flatten__`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor
# The operations after which the result is still the weight (FSDP2's sharding, to_empty, copies): torchao's own
# list, so the subclass follows the base class's behaviour.
from torchao.float8.fsdp_utils import _ops_to_preserve_subclass as _PRESERVE_SUBCLASS


def scale_and_cast(x: torch.Tensor, scale: torch.Tensor, float8_dtype: torch.dtype) -> torch.Tensor:
    """x * scale in float32, saturated to the float8 range and rounded to `float8_dtype` (torchao's
    `hp_tensor_and_scale_to_float8` arithmetic)."""
    limit = torch.finfo(float8_dtype).max
    return (x.to(torch.float32) * scale).clamp(min=-limit, max=limit).to(float8_dtype)


_compiled_scale_and_cast = torch.compile(scale_and_cast, fullgraph=True, dynamic=True)


class Float8AllGatherWeight(WeightWithDynamicFloat8CastTensor):
    """torchao's float8 all-gather weight whose pre-all-gather cast (with a precomputed scale) is one compiled
    kernel. Build it with `use_fused_float8_cast(model)` after the float8 conversion, before FSDP2."""

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        if func == torch.ops.aten.detach.default:
            return cls(args[0]._tensor, args[0]._linear_mm_config, args[0]._dtype)
        first = next(a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, WeightWithDynamicFloat8CastTensor))
        args, kwargs = pytree.tree_map_only(WeightWithDynamicFloat8CastTensor, lambda t: t._tensor,
                                            (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _PRESERVE_SUBCLASS:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda t: cls(t, first._linear_mm_config, first._dtype), out)

    def __tensor_flatten__(self):
        inner = ["_tensor"] if self._precomputed_scale is None else ["_tensor", "_precomputed_scale"]
        return inner, {"mm_config": self._linear_mm_config, "dtype": self._dtype}

    @staticmethod
    def __tensor_unflatten__(inner_tensors, flatten_spec, outer_size, outer_stride):
        return Float8AllGatherWeight(inner_tensors["_tensor"], flatten_spec["mm_config"], flatten_spec["dtype"],
                                     inner_tensors.get("_precomputed_scale"))

    def fsdp_pre_all_gather(self, mesh):
        scale = self._precomputed_scale  # read once: the optimizer's post-step hook replaces it
        if scale is None:  # no precomputed scale: torchao's amax, all-reduced over the mesh, then the cast
            return super().fsdp_pre_all_gather(mesh)
        return (_compiled_scale_and_cast(self._tensor, scale, self._dtype),), (scale,)


def use_fused_float8_cast(model: nn.Module) -> int:
    """Re-wrap every torchao float8 all-gather weight of `model` as a `Float8AllGatherWeight` (same tensor,
    config and requires_grad; on the meta device too). Returns how many. Before FSDP2 is applied."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)  # a Parameter of a tensor subclass has the subclass's type
        if type(weight) is not WeightWithDynamicFloat8CastTensor:
            continue
        module.weight = nn.Parameter(
            Float8AllGatherWeight(weight._tensor, weight._linear_mm_config, weight._dtype, weight._precomputed_scale),
            requires_grad=module.weight.requires_grad)
        count += 1
    return count


# Checkpoints loaded with weights_only may name the class (as torchao allowlists its own).
torch.serialization.add_safe_globals([Float8AllGatherWeight])
