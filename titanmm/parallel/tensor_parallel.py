"""Tensor parallelism with sequence parallelism for the Llama-family decoder (DTensor plans).

Activations between blocks are sharded on the sequence dimension (Shard(1)); inside attention and
the MLP they are replicated and the weights are split Megatron-style: q/k/v and gate/up
column-wise, the output projections row-wise. The vocabulary is split for the embedding and the
output layer; with loss parallel the logits stay vocabulary-sharded into the loss. With float8's
tensorwise recipe the block plans use torchao's float8 styles, which cast activations to float8
before the all-gathers (half the bytes).

`sequence_parallel=False` (inference, `titanmm.generate`) keeps the activations between blocks
replicated instead: every rank holds whole sequences (the KV cache of its own heads, and a VLM's
token embeddings into which the image embeddings are merged), the norms are not split, and the
row-wise layers all-reduce.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel, parallelize_module

from titanmm.parallel.float8 import tp_styles


def apply_tp_llama(model: nn.Module, tp_mesh: DeviceMesh, loss_parallel: bool,
                   float8_tensorwise: bool = False, sequence_parallel: bool = True) -> None:
    between = Shard(1) if sequence_parallel else Replicate()  # activations between blocks
    top_plan = {}
    if model.tok_embeddings is not None:
        top_plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if model.norm is not None and sequence_parallel:
        top_plan["norm"] = SequenceParallel()
    if model.output is not None:
        top_plan["output"] = ColwiseParallel(input_layouts=between,
                                             output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                             use_local_output=not loss_parallel)
    parallelize_module(model, tp_mesh, top_plan)

    colwise, rowwise, prepare_input = tp_styles(float8_tensorwise)
    block_plan = {
        "attention_norm": SequenceParallel(),
        "attention": prepare_input(input_layouts=(between, None, None),
                                   desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": colwise(),
        "attention.wk": colwise(),
        "attention.wv": colwise(),
        "attention.wo": rowwise(output_layouts=between),
        "ffn_norm": SequenceParallel(),
        "feed_forward": prepare_input(input_layouts=(between,), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": colwise(),
        "feed_forward.w2": rowwise(output_layouts=between),
        "feed_forward.w3": colwise(),
    }
    if not sequence_parallel:
        del block_plan["attention_norm"], block_plan["ffn_norm"]
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)
    model.tie_weights()
