"""Pipeline parallelism with torch.distributed.pipelining: cut the model into stages, run them by a schedule.

Stages. The language model's transformer blocks are dealt out, in order, to S stages. The first
stage also holds the token embedding and everything of the model outside the language model (a
VLM's vision tower and projector); the last stage holds the final norm and the output layer. With
`pipeline_parallel_{first,last}_stage_less_layers` = f, l, the model's n blocks plus f + l count as
n + f + l "layers" that split evenly: every stage gets L = (n + f + l) / S of them, the first holds
L - f blocks and the last L - l. S is (n + f + l) / `pipeline_parallel_layers_per_stage`, or by
default one stage per rank (GPipe, 1F1B) or two (the multi-stage schedules). Example: 30 blocks,
pp 4, 1F1B, first/last less 1 and 1: 32 layers, 8 per stage; the stages hold 7, 8, 8 and 7 blocks.

A stage is a deep copy of the whole model (still on the meta device) with what it does not own
deleted: blocks outside its range are removed from `layers` (a ModuleDict keyed by the global block
index, so parameter names are those of the unsplit model and checkpoints stay layout-free), the
other modules are set to None. The model's forward skips None modules and takes hidden states
where the token ids would go. Each stage is then parallelized like a whole model (TP, AC, compile,
FSDP2), so the schedule sees plain modules.

Placement. Stage s runs on pp rank s mod pp ("loop": rank r holds r, r + pp, r + 2 pp, ...), except
for ZBVZeroBubble, whose two stages per rank form a V: rank r holds r and S - 1 - r, so the first and
the last stage are both on rank 0.

Inputs. The token ids (and a VLM's pixel values) are positional arguments, which the schedule
hands to the first stage only. Position ids and document ids are keyword arguments: the schedule
splits them into microbatches like the batch and passes them to every stage, and each stage builds
its attention mask from them (a mask is cheap next to the blocks; sending it between stages would
cost more). Only the hidden states [microbatch, seq / (tp * cp), dim] travel between stages.

Shapes are given to each stage up front (`stage_io`), so no shape-inference pass runs: such a pass
costs a forward, and on torch 2.11 it feeds the first stage zeros instead of the real token ids,
which a VLM rejects (its image placeholders would not match the images).

Loss. The schedule calls `loss_fn(logits, labels)` on the last stage per microbatch and runs the
backward from its result, with `scale_grads=False`: the trainer's loss_fn returns the summed token
cross-entropy times the step's global normalisation, exactly what the non-pipelined step backpropagates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
    ScheduleZBVZeroBubble,
)

from titanmm.config.job_config import JobConfig
from titanmm.parallel.parallel_dims import ParallelDims

SCHEDULES = {
    "GPipe": ScheduleGPipe,
    "1F1B": Schedule1F1B,
    "Interleaved1F1B": ScheduleInterleaved1F1B,
    "LoopedBFS": ScheduleLoopedBFS,
    "InterleavedZeroBubble": ScheduleInterleavedZeroBubble,
    "ZBVZeroBubble": ScheduleZBVZeroBubble,
}
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
V_SCHEDULES = ("ZBVZeroBubble",)
# Zero-bubble schedules run the input- and weight-gradient halves of backward separately.
ZERO_BUBBLE_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def language_model(model: nn.Module) -> nn.Module:
    """The decoder of a model: a VLM's `lm`, or the model itself."""
    return getattr(model, "lm", model)


def count_stages(p, n_layers: int) -> int:
    """Number of pipeline stages for the `[parallelism]` section `p` and a model of `n_layers` blocks."""
    pp, schedule = p.pipeline_parallel_degree, p.pipeline_parallel_schedule
    weighted = n_layers + p.pipeline_parallel_first_stage_less_layers + p.pipeline_parallel_last_stage_less_layers
    if p.pipeline_parallel_layers_per_stage > 0:
        if weighted % p.pipeline_parallel_layers_per_stage:
            raise ValueError(
                f"parallelism.pipeline_parallel_layers_per_stage = {p.pipeline_parallel_layers_per_stage} does not "
                f"divide the model's {n_layers} blocks + pipeline_parallel_first/last_stage_less_layers = {weighted}")
        stages = weighted // p.pipeline_parallel_layers_per_stage
    else:
        stages = pp * (1 if schedule in SINGLE_STAGE_SCHEDULES else 2)
    if stages % pp:
        raise ValueError(f"parallelism.pipeline_parallel_layers_per_stage = {p.pipeline_parallel_layers_per_stage} "
                         f"gives {stages} stages, not a multiple of parallelism.pipeline_parallel_degree = {pp}")
    per_rank = stages // pp
    if schedule in SINGLE_STAGE_SCHEDULES and per_rank != 1:
        raise ValueError(f"parallelism.pipeline_parallel_schedule = {schedule!r} runs one stage per rank, but "
                         f"parallelism.pipeline_parallel_layers_per_stage = {p.pipeline_parallel_layers_per_stage} "
                         f"gives {per_rank}")
    if schedule in V_SCHEDULES and per_rank != 2:
        raise ValueError(f"parallelism.pipeline_parallel_schedule = {schedule!r} runs two stages per rank, but "
                         f"parallelism.pipeline_parallel_layers_per_stage = {p.pipeline_parallel_layers_per_stage} "
                         f"gives {per_rank}")
    if schedule not in SINGLE_STAGE_SCHEDULES and per_rank < 2:
        raise ValueError(f"parallelism.pipeline_parallel_schedule = {schedule!r} runs two or more stages per rank, "
                         f"but parallelism.pipeline_parallel_layers_per_stage = "
                         f"{p.pipeline_parallel_layers_per_stage} gives {per_rank}")
    return stages


def stage_layers(p, n_layers: int) -> list[range]:
    """The (global) block indices of each stage, first to last; see the module docstring."""
    stages = count_stages(p, n_layers)
    first_less, last_less = p.pipeline_parallel_first_stage_less_layers, p.pipeline_parallel_last_stage_less_layers
    weighted = n_layers + first_less + last_less
    if weighted % stages or weighted < stages:
        raise ValueError(f"the model's {n_layers} blocks + parallelism.pipeline_parallel_first/last_stage_less_layers "
                         f"= {weighted} do not split evenly into {stages} pipeline stages")
    per_stage = weighted // stages
    counts = [per_stage] * stages
    counts[0] -= first_less
    counts[-1] -= last_less
    if counts[0] < 0 or counts[-1] < 0:
        raise ValueError(f"parallelism.pipeline_parallel_first/last_stage_less_layers = {first_less}/{last_less} "
                         f"exceed the {per_stage} layers per stage")
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges


def stage_ids(pp_rank: int, pp: int, stages: int, schedule: str) -> list[int]:
    """The stages that pp rank `pp_rank` runs, in order."""
    if schedule in V_SCHEDULES:
        return [pp_rank, stages - 1 - pp_rank]
    return list(range(pp_rank, stages, pp))


def stage_module(model: nn.Module, blocks: range, first: bool, last: bool) -> nn.Module:
    """A deep copy of `model` (on the meta device) keeping only what one stage owns."""
    stage = copy.deepcopy(model)
    lm = language_model(stage)
    keep = {str(i) for i in blocks}
    for name in list(lm.layers.keys()):
        if name not in keep:
            del lm.layers[name]
    if not first:
        lm.tok_embeddings = None
        if lm is not stage:  # a VLM: its vision tower and projector go with the embedding
            for name, child in list(stage.named_children()):
                if child is not lm:
                    setattr(stage, name, None)
    if not last:
        lm.norm = None
        lm.output = None
    return stage


def split_model(model: nn.Module, dims: ParallelDims, config: JobConfig) -> tuple[dict[int, nn.Module], int]:
    """This rank's stages of `model` ({stage index: module}, in schedule order) and the number of stages."""
    p = config.parallelism
    lm = language_model(model)
    if lm.args.tie_word_embeddings:
        raise ValueError(f"parallelism.pipeline_parallel_degree = {dims.pp}: the model ties the output layer to the "
                         "token embedding, which pipeline stages would separate")
    layers = stage_layers(p, len(lm.layers))
    pp_rank = dims.mesh_for("pp").get_local_rank()
    ids = stage_ids(pp_rank, dims.pp, len(layers), p.pipeline_parallel_schedule)
    stages = {i: stage_module(model, layers[i], first=i == 0, last=i == len(layers) - 1) for i in ids}
    for index, stage in stages.items():  # each stage has its own optimizer
        if not any(param.requires_grad for param in stage.parameters()):
            raise ValueError(f"pipeline stage {index} has no parameter to train (model.freeze); every stage needs one")
    return stages, len(layers)


def stage_io(index: int, stages: int, lm_args, dims: ParallelDims, config: JobConfig,
             device: torch.device) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Meta tensors shaped like one microbatch's positional input and output of stage `index`.

    Between stages: hidden states [microbatch, seq / (cp * tp), dim] (context parallelism gives each
    rank a slice of the sequence, sequence parallelism splits it further) in the compute dtype
    (FSDP2's parameter dtype on GPU, float32 on CPU). The first stage's input is the token ids (the
    batch supplies it and any further inputs; they are not checked against this); the last stage's
    output is the logits [microbatch, seq / cp, vocab].
    """
    mb = config.parallelism.pipeline_parallel_microbatch_size
    seq = config.training.seq_len // dims.cp
    dtype = _DTYPES[config.training.mixed_precision_param] if device.type == "cuda" else torch.float32
    # requires_grad marks what backward sends gradients for.
    hidden = torch.empty(mb, seq // dims.tp, lm_args.dim, dtype=dtype, device="meta", requires_grad=True)
    logits = torch.empty(mb, seq, lm_args.vocab_size, dtype=dtype, device="meta", requires_grad=True)
    inputs = torch.empty(mb, seq, dtype=torch.long, device="meta") if index == 0 else hidden
    outputs = logits if index == stages - 1 else hidden
    return (inputs,), (outputs,)


def build_schedule(stages: dict[int, nn.Module], num_stages: int, lm_args, dims: ParallelDims, config: JobConfig,
                   device: torch.device, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The pipeline schedule running this rank's (parallelized, materialised) stage modules."""
    p = config.parallelism
    if p.pipeline_parallel_schedule in V_SCHEDULES and device.type == "cpu" and _torch_version() < (2, 13):
        raise ValueError(f"parallelism.pipeline_parallel_schedule = {p.pipeline_parallel_schedule!r} needs torch >= "
                         "2.13 on CPU: before, its set-up sends from a rank to itself, which gloo cannot do")
    group = dims.mesh_for("pp").get_group()
    pipeline_stages = []
    for index, module in stages.items():
        inputs, outputs = stage_io(index, num_stages, lm_args, dims, config, device)
        pipeline_stages.append(PipelineStage(module, index, num_stages, device, input_args=inputs,
                                             output_args=outputs, group=group))
    schedule_cls = SCHEDULES[p.pipeline_parallel_schedule]
    n_microbatches = config.training.local_batch_size // p.pipeline_parallel_microbatch_size
    single = p.pipeline_parallel_schedule in SINGLE_STAGE_SCHEDULES
    return schedule_cls(pipeline_stages[0] if single else pipeline_stages, n_microbatches=n_microbatches,
                        loss_fn=loss_fn, scale_grads=False)
