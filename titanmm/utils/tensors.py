"""Tensor subclasses that wrap one plain tensor (torchao's FP8 all-gather weights, titanmm's
`Float8AllGatherWeight`): the tensor that holds their values."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def wrapped_tensor(wrapper: torch.Tensor) -> torch.Tensor:
    """The plain tensor inside a (possibly nested) wrapper subclass, the first inner tensor of its
    `__tensor_flatten__`, which must have the wrapper's shape and dtype; a plain tensor is returned as it is.
    (torchao's `__tensor_flatten__` reads a precomputed scale on the host: callers in a hot loop cache this.)"""
    inner = wrapper
    while is_traceable_wrapper_subclass(inner) and not isinstance(inner, DTensor):
        inner = getattr(inner, inner.__tensor_flatten__()[0][0])
    if inner.shape != wrapper.shape or inner.dtype != wrapper.dtype:
        raise TypeError(f"a {type(wrapper).__name__} {tuple(wrapper.shape)} {wrapper.dtype} does not wrap one tensor "
                        f"of its shape and dtype (its first inner tensor: {tuple(inner.shape)} {inner.dtype})")
    return inner


def without_wrapper(t: torch.Tensor) -> torch.Tensor:
    """`t` with a wrapper subclass replaced by the tensor it wraps, inside a DTensor too (same mesh, placements
    and global shape); the result shares `t`'s storage."""
    if not isinstance(t, DTensor):
        return wrapped_tensor(t)
    local = t._local_tensor
    if not is_traceable_wrapper_subclass(local):
        return t
    return DTensor.from_local(wrapped_tensor(local), t.device_mesh, t.placements, run_check=False, shape=t.shape,
                              stride=t.stride())
