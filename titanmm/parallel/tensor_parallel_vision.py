"""Tensor parallelism for the vision-language model: ViT blocks, projector, language model.

ViT blocks (every titanmm vision tower names them alike): q/k/v and fc1 are split column-wise
(by heads / hidden units), the output projections row-wise, so attention and the MLP each end in
one all-reduce. Activations between blocks stay replicated: tiles give token counts that need not
divide by the TP degree, so the vision tower has no sequence parallelism. Norms, layer-scale and
the embeddings stay plain replicated parameters.

qk-norm (InternViT-6B) normalises q and k over the *full* hidden vector, all heads jointly, before
the heads are split. With q/k sharded by heads, the norm runs on a DTensor `Shard(-1)` view of the
local piece: its mean of squares then becomes a cross-rank reduction, and the result is handed
back as the local `Shard(-1)` piece, so the statistics equal the single-device ones exactly.

Projector: LayerNorm replicated, `linear_1` column-wise, `linear_2` row-wise (replicated output).

Language model: the Llama plan (`apply_tp_llama`, sequence parallel between blocks) except for the
token embedding, whose output stays replicated so that the image embeddings can be scattered into
the full sequence; the first block's input is then split on the sequence.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               parallelize_module)
from torch.distributed.tensor.parallel.style import ParallelStyle

from titanmm.parallel.tensor_parallel import apply_tp_llama


class HiddenShardedNorm(ParallelStyle):
    """A norm over the last dim whose input arrives sharded on that dim (local pieces).

    The weight is replicated; the input piece is wrapped as a DTensor `Shard(-1)`, so DTensor
    computes the statistics across ranks; the output is returned as the local `Shard(-1)` piece.
    """

    @staticmethod
    def _input_fn(module, inputs, mesh):
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Shard(x.ndim - 1)], run_check=False)
        return (x, *inputs[1:])

    @staticmethod
    def _output_fn(module, output, mesh):
        return output.redistribute(mesh, [Shard(output.ndim - 1)]).to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, None, self._input_fn, self._output_fn)


def _check_divisible(what: str, value: int, tp: int) -> None:
    if value % tp:
        raise ValueError(f"tensor parallel degree {tp} does not divide the {what} ({value})")


def apply_tp_vision(vision: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Megatron-style TP on every ViT block of `vision` (an encoder with `blocks`)."""
    args = vision.args
    tp = tp_mesh.size()
    _check_divisible("vision tower's attention heads", args.num_heads, tp)
    for block in vision.blocks.values():
        plan = {
            "attn.wq": ColwiseParallel(),
            "attn.wk": ColwiseParallel(),
            "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(),
            "mlp.fc1": ColwiseParallel(),
            "mlp.fc2": RowwiseParallel(),
        }
        if getattr(block.attn, "q_norm", None) is not None:
            plan["attn.q_norm"] = HiddenShardedNorm()
        if getattr(block.attn, "k_norm", None) is not None:
            plan["attn.k_norm"] = HiddenShardedNorm()
        parallelize_module(block, tp_mesh, plan)


def apply_tp_projector(projector: nn.Module, tp_mesh: DeviceMesh) -> None:
    _check_divisible("projector's hidden size", projector.args.hidden_dim, tp_mesh.size())
    parallelize_module(projector, tp_mesh, {"linear_1": ColwiseParallel(), "linear_2": RowwiseParallel()})


def apply_tp_lm_for_vlm(lm: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
    """The Llama plan, with a replicated embedding output and the sequence split at the first block.

    A pipeline stage without the embedding takes hidden states already split on the sequence."""
    embedding, lm.tok_embeddings = lm.tok_embeddings, None
    try:
        apply_tp_llama(lm, tp_mesh, loss_parallel)
    finally:
        lm.tok_embeddings = embedding
    if embedding is None:
        return
    if not lm.layers:
        raise ValueError("under tensor parallelism the language model's first block splits the sequence; the "
                         "pipeline stage holding the token embedding needs at least one block "
                         "(parallelism.pipeline_parallel_first_stage_less_layers)")
    parallelize_module(embedding, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()))
    first = next(iter(lm.layers.values()))
    parallelize_module(first, tp_mesh, PrepareModuleInput(input_layouts=(Replicate(), None, None),
                                                          desired_input_layouts=(Shard(1), None, None),
                                                          use_local_output=True))
    lm.tie_weights()


def apply_tp_vlm(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool) -> None:
    """TP for all three parts of a `VisionLanguageModel` (a pipeline stage after the first has only the LM)."""
    if model.vision is not None:
        apply_tp_vision(model.vision, tp_mesh)
        apply_tp_projector(model.projector, tp_mesh)
    apply_tp_lm_for_vlm(model.lm, tp_mesh, loss_parallel)
