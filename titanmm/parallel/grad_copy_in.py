"""FSDP2's reduce-scatter copy-in as one strided copy per gradient (parallelism.fsdp_grad_copy_in_per_parameter).

Before each unit's reduce-scatter, FSDP2 copies the unit's unsharded gradients into one buffer of the reduce dtype
laid out as [world size, shard]: row r holds, for every parameter in turn, the r-th chunk of its (dim-0 padded)
gradient (`fsdp::chunk_cat`, i.e. `torch._chunk_cat`). That copy runs on the compute stream, so its time adds to
the step's. Here it is one `copy_` per gradient, `[world, chunk]` into its column block of the buffer (the cast
to the reduce dtype included), the padding zeroed: the same bytes, through PyTorch's vectorized copy kernel.
`register()` installs it as the CUDA kernel of `fsdp::chunk_cat` for the whole process; `unregister()` restores
FSDP2's.
"""

from __future__ import annotations

import warnings

import torch

_library: torch.library.Library | None = None


def chunk_cat_per_parameter(tensors: list[torch.Tensor], dim: int, num_chunks: int, *, out: torch.Tensor) -> None:
    """`torch._chunk_cat(tensors, dim, num_chunks, out=out)` for FSDP2's use (dim 0): out viewed as [num_chunks,
    -1], row r = the r-th dim-0 chunk of every tensor (each padded with zeros to a multiple of num_chunks rows),
    flattened, one after the other."""
    if dim != 0 or any(t.dim() == 0 for t in tensors):
        torch._chunk_cat(tensors, dim, num_chunks, out=out)
        return
    out_2d = out.view(num_chunks, -1)
    offset = 0
    for tensor in tensors:
        rows = tensor.size(0)
        row_numel = tensor.numel() // rows if rows else 0
        chunk_rows = -(-rows // num_chunks)
        width = chunk_rows * row_numel
        block = out_2d[:, offset:offset + width]  # [num_chunks, width]
        full = rows // chunk_rows if chunk_rows else 0  # chunks with no padding
        if full:
            block[:full].copy_(tensor[:full * chunk_rows].reshape(full, width))
        if full < num_chunks:  # the padded tail: a partial chunk, then whole chunks of zeros
            tail = tensor[full * chunk_rows:].reshape(-1)
            block[full, :tail.numel()].copy_(tail)
            block[full, tail.numel():].zero_()
            block[full + 1:].zero_()
        offset += width
    if offset != out_2d.size(1):
        raise ValueError(f"fsdp::chunk_cat: the tensors fill {offset} of the output's {out_2d.size(1)} columns")


def register() -> None:
    """Make `chunk_cat_per_parameter` the CUDA kernel of FSDP2's `fsdp::chunk_cat` (once per process)."""
    global _library
    if _library is not None:
        return
    import torch.distributed.fsdp._fully_shard._fsdp_collectives  # noqa: F401  (defines fsdp::chunk_cat)

    library = torch.library.Library("fsdp", "IMPL")
    with warnings.catch_warnings():  # the override is the point
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
        library.impl("chunk_cat", chunk_cat_per_parameter, "CUDA")
    _library = library


def unregister() -> None:
    """Give `fsdp::chunk_cat` its own CUDA kernel back."""
    global _library
    if _library is not None:
        _library._destroy()
        _library = None
