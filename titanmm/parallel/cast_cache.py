"""FSDP2's low-precision copy of each parameter shard, kept between all-gathers instead of cast for each.

With mixed precision (float32 parameters, bfloat16 compute) FSDP2 casts every float32 shard to bfloat16 before
each all-gather, into a temporary, then copies that into the all-gather buffer: twice a step when blocks are
resharded after forward (forward, and again in backward), though the parameters only change at the optimizer
step. On 2 H200s that cast was 26-29 ms of kernel time per Llama 3 8B step (a foreach copy float32 -> bfloat16,
in titanmm and torchtitan alike: `benchmarks/results/2026-11-23_h200x2_llama3_8b_bf16_*_rank0_kernels.txt`), on
the all-gather stream, contending with the matmuls.

`CachedCastWeight` wraps a float32 parameter (the local shard once FSDP2 has sharded it) and hands FSDP2 a
bfloat16 copy it keeps, re-cast only when the float32 values may have changed since: an in-place write to the
tensor bumps its version counter (a checkpoint load, the compiled optimizer), one through the wrapper (torch's
fused AdamW on the DTensor parameter, an initialisation) is counted by the wrapper. So the cast
runs once per step, and not at all when the compiled AdamW (titanmm.compiled_adamw) writes the copy in the same
kernel as the update (2 more bytes per parameter). The price: the copy stays allocated, 2 bytes per parameter
of the shard (4 GiB per GPU for Llama 3 8B over 4 GPUs).

Everything else sees the float32 tensor: the wrapper unwraps itself in every operation, keeping its type only
through those FSDP2 uses to shard and initialise parameters, and checkpoints save the wrapped tensor
(titanmm.checkpoint.states).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

_aten = torch.ops.aten
# The operations whose result is still the parameter: FSDP2's sharding (chunk, padding, views), to_empty, copies.
_PRESERVE_WRAPPER = {_aten.empty_like.default, _aten.new_zeros.default, _aten.slice.Tensor, _aten.copy_.default,
                     _aten.view.default, _aten.as_strided.default, _aten._to_copy.default, _aten._pin_memory.default,
                     _aten.split.Tensor, _aten.clone.default}


# Writes through a CachedCastWeight (an optimizer step on the DTensor parameter, an initialisation) reach the
# wrapped tensor inside __torch_dispatch__, below the dispatcher's version-counter bump: counted here instead,
# per storage (a write through any view of a parameter counts for all of them).
_writes_through_wrappers: dict[int, int] = {}
_written_positions: dict[torch._ops.OpOverload, list[tuple[int, str]]] = {}


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _note_write(t: torch.Tensor) -> None:
    key = _storage_key(t)
    _writes_through_wrappers[key] = _writes_through_wrappers.get(key, 0) + 1


def _written_wrappers(func, args, kwargs) -> list[CachedCastWeight]:
    """The CachedCastWeights among the arguments `func` writes to (by its schema: `Tensor(a!)`)."""
    positions = _written_positions.get(func)
    if positions is None:
        positions = _written_positions[func] = [
            (i, a.name) for i, a in enumerate(func._schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    written = []
    for i, name in positions:
        value = args[i] if i < len(args) else kwargs.get(name)
        written += [t for t in pytree.tree_leaves(value) if isinstance(t, CachedCastWeight)]
    return written


class CachedCastWeight(torch.Tensor):
    """A parameter whose FSDP2 all-gather input, the parameter cast to the compute dtype, is cached until the
    parameter changes. Build with `cache_param_casts(model, dtype)` before FSDP2 is applied."""

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, cast_dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, tensor.size(), strides=tensor.stride(), storage_offset=tensor.storage_offset(), dtype=tensor.dtype,
            layout=tensor.layout, device=tensor.device, requires_grad=tensor.requires_grad)

    def __init__(self, tensor: torch.Tensor, cast_dtype: torch.dtype):
        self._tensor = tensor
        self._cast_dtype = cast_dtype
        self._cast: torch.Tensor | None = None  # the all-gather input: padded rows, in cast_dtype
        self._cast_of: tuple[int, int] | None = None  # _values_version() when _cast was written

    def __repr__(self):
        return f"CachedCastWeight(to {self._cast_dtype}, {self._tensor!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        if func == _aten.detach.default:
            return cls(args[0]._tensor.detach(), args[0]._cast_dtype)
        first = next(a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, CachedCastWeight))
        for written in _written_wrappers(func, args, kwargs or {}):
            _note_write(written._tensor)
        args, kwargs = pytree.tree_map_only(CachedCastWeight, lambda t: t._tensor, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _PRESERVE_WRAPPER:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda t: cls(t, first._cast_dtype), out)

    def __tensor_flatten__(self):
        return ["_tensor"], self._cast_dtype

    @staticmethod
    def __tensor_unflatten__(inner_tensors, cast_dtype, outer_size, outer_stride):
        return CachedCastWeight(inner_tensors["_tensor"], cast_dtype)

    def cast_buffer(self) -> torch.Tensor | None:
        """The cached copy's rows of this shard (flat, `cast_dtype`) for a writer that keeps it current (then
        `mark_cast_current()`), or None before the first all-gather allocated it."""
        if self._cast is None:
            return None
        return self._cast.view(-1)[: self._tensor.numel()]

    def mark_cast_current(self) -> None:
        """The cached copy was written from the current values (by the optimizer's update kernel)."""
        self._cast_of = self._values_version()

    def _values_version(self) -> tuple[int, int]:
        """Changes whenever the values may have: writes to the tensor itself bump its version counter; writes
        through a wrapper (which run below the dispatcher's version bump) are counted per storage."""
        return self._tensor._version, _writes_through_wrappers.get(_storage_key(self._tensor), 0)

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        dtype = mp_policy.param_dtype or self.dtype
        if dtype != self._cast_dtype:
            raise ValueError(f"a parameter cached for {self._cast_dtype} all-gathered in {dtype}")
        if self._cast is None:
            # FSDP2 pads dim 0 to a multiple of the shard count; the all-gather input has the padded rows.
            shards = mesh.size(mesh.ndim - 1)  # the shard dimension (torch 2.11 rejects -1)
            padded_rows = -(-outer_size[0] // shards)
            self._cast = self._tensor.new_zeros((padded_rows, *self._tensor.shape[1:]), dtype=dtype)
        version = self._values_version()
        if self._cast_of != version:
            self._cast[: self._tensor.shape[0]].copy_(self._tensor)
            self._cast_of = version
        return (self._cast,), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (gathered,) = all_gather_outputs
        if out is not None:  # FSDP2 re-allocated the storage `out` views: nothing to rebuild
            return None
        return gathered, (gathered,)


def cache_param_casts(model: nn.Module, cast_dtype: torch.dtype) -> int:
    """Wrap every floating-point parameter of `model` (of at least one dimension) not stored in `cast_dtype` as a
    `CachedCastWeight`, each once (shared parameters stay shared). Before FSDP2 is applied. Tensor-parallel
    (DTensor) parameters and wrapper subclasses (the FP8 all-gather weights) are left to FSDP2's own cast.
    Returns how many were wrapped."""
    wrapped: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) in wrapped:
                module._parameters[name] = wrapped[id(param)]
                continue
            if (not param.is_floating_point() or param.dtype == cast_dtype or param.dim() == 0
                    or isinstance(param, DTensor) or is_traceable_wrapper_subclass(param.data)):
                continue
            wrapped[id(param)] = module._parameters[name] = nn.Parameter(
                CachedCastWeight(param.data, cast_dtype), requires_grad=param.requires_grad)
    return len(wrapped)
