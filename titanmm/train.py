"""Training entry point.

    torchrun --nproc_per_node=N -m titanmm.train --config train_configs/X.toml [--section.key=value ...]

One step: every data-parallel rank takes its micro-batches of the global batch for this step,
runs forward and backward on each (the loss is normalised by the number of trained tokens of the
whole global batch), the gradients are clipped by their global norm, and the optimizer steps
unless the loss or the norm is not finite. With fused optimizers the clipping and that decision
happen on the device, so the host queues step after step and reads losses only when it logs,
checkpoints or stops (`Trainer.settle_steps`); batches come in pinned memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from eval.online import OnlineEval
from titanmm.checkpoint.manager import CheckpointManager
from titanmm.checkpoint.states import ModelState, OptimizerState, SchedulerState, TrainState
from titanmm.config import JobConfig, load_config
from titanmm.config.loader import ConfigError, format_config, language_model_args, parse_args
from titanmm.data import IGNORE_INDEX, StepBatcher, build_text_data, build_tokenizer
from titanmm.data.vlm_data import VLMData, build_vlm_data, tiles_by_sample
from titanmm.distributed import all_reduce, init_distributed
from titanmm.metrics import MetricsLogger
from titanmm.models import get_model_spec
from titanmm.models.attention import set_sdpa_backends
from titanmm.models.lm_head import cross_entropy_sum_and_grad
from titanmm.models.vlm.freeze import freeze
from titanmm.optim import build_lr_scheduler, build_optimizer, clip_grad_norm_, clipped_step
from titanmm.parallel import PARALLELIZE_FNS, ParallelDims
from titanmm.parallel.context_parallel import context_parallel_micro_batch, image_feature_index
from titanmm.parallel.float8 import (convert_to_float8, for_shard_degree, precompute_scales,
                                    register_scale_precompute)
from titanmm.parallel.fsdp import GatherDuringOptimizer, first_forward_units
from titanmm.parallel.grad_norm import BackwardGradNorm
from titanmm.parallel.parallelize import frozen_params_dtype, mixed_precision_context
from titanmm.parallel.pipeline import build_schedule, language_model, split_model
from titanmm.utils.profiling import Profiler
from titanmm.utils.signals import PreemptionHandler

logger = logging.getLogger("titanmm")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss or gradient."""


def model_args_for(config: JobConfig):
    """Model shape from `model.flavor`, or from an HF config.json when `model.hf_config` is set."""
    spec = get_model_spec(config.model.name)
    if config.model.hf_config:
        from titanmm.checkpoint.hf_mapping import args_from_hf_config, read_hf_config

        args = args_from_hf_config(read_hf_config(config.model.hf_config))
        if config.training.seq_len > args.max_seq_len:
            raise ConfigError(f"training.seq_len = {config.training.seq_len} exceeds max_seq_len {args.max_seq_len} "
                              f"of model.hf_config = {config.model.hf_config}")
    else:
        args = spec.flavors[config.model.flavor]
    if config.model.n_layers:
        base_lm = language_model_args(args)
        lm = dataclasses.replace(base_lm, n_layers=config.model.n_layers)
        args = lm if base_lm is args else dataclasses.replace(args, lm=lm)
    return spec, args


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of the token cross-entropies (labels IGNORE_INDEX do not count), each times its weight when given."""
    if weights is None:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    token_losses = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1), ignore_index=IGNORE_INDEX,
                                   reduction="none")
    if isinstance(token_losses, DTensor):  # loss parallel
        token_losses = token_losses.full_tensor()
    return (token_losses * weights.flatten()).sum()


class Trainer:
    def __init__(self, config: JobConfig):
        self.config = config
        if config.training.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        self.rank, self.world_size, self.device = init_distributed()
        self.dims = ParallelDims.from_config(config.parallelism, self.world_size)
        self.dims.build_mesh(self.device.type)
        if self.dims.cp > 1 and self.device.type != "cuda":
            raise ConfigError("parallelism.context_parallel_degree > 1 needs GPUs: ring attention has no CPU kernels")
        torch.manual_seed(config.training.seed)
        if config.training.deterministic:
            torch.use_deterministic_algorithms(True)
        self.dump_folder = Path(config.job.dump_folder)
        self.dump_folder.mkdir(parents=True, exist_ok=True)
        # Before the model: CUDA memory snapshots then show where the weights were allocated.
        self.profiler = Profiler(config.profiling, self.dump_folder, self.rank, self.device)

        # The loss upcasts the [tokens, vocabulary] logits to float32: compiled, the cast fuses into the
        # cross-entropy kernels instead of materialising a float32 copy (and its gradient) of the logits.
        # With loss parallel the logits stay vocabulary-sharded DTensors, which the compiled loss does not take.
        loss_parallel_on = self.dims.tp_enabled and config.parallelism.enable_loss_parallel
        compile_loss = config.compile.enable and not loss_parallel_on
        self.loss_fn = torch.compile(cross_entropy_sum) if compile_loss else cross_entropy_sum
        # training.loss_chunk_tokens > 0: the output layer returns the loss (no logits; models.lm_head).
        self.loss_in_output_layer = config.training.loss_chunk_tokens > 0

        set_sdpa_backends(config.model.sdpa_backends)  # before the blocks are compiled
        # One GPU without parallelism: torch.autocast around the forward (else FSDP2 casts the parameters).
        self.mixed_precision = mixed_precision_context(self.dims, config, self.device.type)
        # Model: built on meta, parallelized, then materialised shard by shard and initialised.
        self.model_spec, self.model_args = model_args_for(config)
        self.lm_args = language_model_args(self.model_args)
        with torch.device("meta"):
            self.model = self.model_spec.model_cls(self.model_args)
        config.float8 = for_shard_degree(config.float8, self.dims.dp_shard * self.dims.cp)
        if config.float8.enable:  # before parallelism: TP / FSDP2 see the float8 linears
            convert_to_float8(self.model, config.float8)
        frozen_dtype = frozen_params_dtype(config, self.device.type)  # frozen weights materialise in it
        if config.model.freeze and freeze(self.model, config.model.freeze, frozen_dtype) == 0:  # before FSDP2, optim
            raise ConfigError(f"model.freeze = {config.model.freeze} leaves no parameter to train")
        # With pipeline parallelism each rank holds stages (copies of the model keeping their part of it)
        # and `self.model` stays the whole model on the meta device: its shape, never run.
        self.model_parts, self.pp_schedule = [self.model], None
        if self.dims.pp > 1:
            pp_stages, pp_num_stages = split_model(self.model, self.dims, config)
            self.model_parts = list(pp_stages.values())
        if self.loss_in_output_layer:
            head = language_model(self.model).output
            head.loss_chunk_tokens = config.training.loss_chunk_tokens
            head.chunk_fn = torch.compile(cross_entropy_sum_and_grad) if config.compile.enable else \
                cross_entropy_sum_and_grad
        for part in self.model_parts:
            PARALLELIZE_FNS[self.model_spec.name](part, self.dims, config, self.device.type)
            part.to_empty(device=self.device)
            part.init_weights(seed=config.training.seed, buffer_device=self.device)
            part.train()
        if self.dims.pp > 1:
            self.pp_loss_scale = 1.0  # the step's loss normalisation, set by train_step
            self.pp_schedule = build_schedule(pp_stages, pp_num_stages, self.lm_args, self.dims, config, self.device,
                                              self._pipeline_loss)
            self.pp_has_first_stage, self.pp_has_last_stage = 0 in pp_stages, pp_num_stages - 1 in pp_stages

        # Data: the global batch of a step is fixed; each dp rank takes its part of it.
        t = config.training
        dp_mesh = self.dims.mesh_for("dp")
        self.dp_rank, self.dp_degree = dp_mesh.get_local_rank(), dp_mesh.size()
        global_batch = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * self.dp_degree
        self.grad_accum_steps = global_batch // (t.local_batch_size * self.dp_degree)
        self.data = self._build_data()

        # One optimizer (and LR schedule) per model part: DCP maps optimizer state to names per module.
        self.optimizers = [build_optimizer([part], config.optimizer) for part in self.model_parts]
        for optimizer, part in zip(self.optimizers, self.model_parts):
            register_scale_precompute(optimizer, [part], config.float8)
        self.schedulers = [build_lr_scheduler(o, config.lr_scheduler, t.steps) for o in self.optimizers]
        self.backward_grad_norm = self._build_backward_grad_norm()
        self.gather_during_optimizer = self._build_gather_during_optimizer()
        self.train_state = TrainState()
        self._unsettled: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # see settle_steps
        # CUDA events around each optimizer phase (norm, clip, step, zero_grad) since the last log: "optimizer_ms".
        self._optimizer_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.checkpoint = CheckpointManager(
            config.checkpoint, str(self.dump_folder),
            states={"model": ModelState(self.model_parts),
                    "optimizer": OptimizerState(self.model_parts, self.optimizers),
                    "lr_scheduler": SchedulerState(self.schedulers), "dataloader": self.data,
                    "train_state": self.train_state},
            meta=dict(model_name=self.model_spec.name, model_args=self.model_args,
                      tokenizer=config.model.tokenizer_path))
        self.train_state.step = self.checkpoint.load(step=config.checkpoint.load_step)
        if self.train_state.step == 0 and config.checkpoint.initial_load_hf:
            from titanmm.checkpoint.hf_load import load_hf_into_model

            for part in self.model_parts:
                load_hf_into_model(part, config.checkpoint.initial_load_hf, progress=self.rank == 0)
        precompute_scales(self.model_parts, config.float8)  # float8 scales of the loaded, not the initial, weights

        self.tokens_per_micro_batch = t.local_batch_size * t.seq_len
        self.metrics = MetricsLogger(config.metrics, str(self.dump_folder), self.rank,
                                     flops_per_token=self.lm_args.training_flops_per_token(t.seq_len),
                                     device_name=torch.cuda.get_device_name(self.device)
                                     if self.device.type == "cuda" else "cpu", world_size=self.world_size)
        self.preemption = PreemptionHandler()
        self.online_eval = OnlineEval(config, self.model, self.dims, self.device, self.dump_folder)
        if self.rank == 0:
            n_params = sum(p.numel() for p in self.model.parameters())
            n_frozen = sum(p.numel() for p in self.model.parameters() if not p.requires_grad)
            frozen_as = str(frozen_dtype).removeprefix("torch.")
            frozen = f" ({n_frozen:,} frozen, in {frozen_as}: {', '.join(config.model.freeze)})" if n_frozen else ""
            logger.info(f"model {self.model_spec.name} ({config.model.flavor}): {n_params:,} parameters{frozen}; "
                        f"mesh {self.dims}; global batch {global_batch} (grad accumulation {self.grad_accum_steps})")

    def _build_data(self) -> StepBatcher | VLMData:
        t = self.config.training
        if self.model_spec.name == "vlm":  # mock or energon image-text data (titanmm.data.vlm_data)
            size = self.model_args.image.tile_size
            return build_vlm_data(self.config, self.model_args, self.model.tokens_per_tile(size, size), self.dp_rank,
                                  self.dp_degree, self.grad_accum_steps, dp_group=self.dims.mesh_for("dp").get_group())
        tokenizer = build_tokenizer(self.config.model.tokenizer_path) if t.dataset != "mock" else None
        if tokenizer is not None and tokenizer.vocab_size > self.lm_args.vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                              f"{self.lm_args.vocab_size} (model.tokenizer_path / model.flavor)")
        # Pinned batches: a copy from pageable memory would wait for the device to finish the previous step.
        return build_text_data(t, tokenizer, self.dp_rank, self.dp_degree, self.grad_accum_steps,
                               vocab_size=self.lm_args.vocab_size, cache_dir=str(self.dump_folder / "data_cache"),
                               pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------------------------------------
    def _loss_parallel(self):
        tp_loss = self.dims.tp_enabled and self.config.parallelism.enable_loss_parallel
        return loss_parallel() if tp_loss else contextlib.nullcontext()

    def _context_parallel_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The micro-batch on the device with what context parallelism shards along the sequence: positions
        (always explicit) and, for a VLM, the image-feature index computed on the whole sequence."""
        out = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
               if isinstance(v, torch.Tensor) and k != "document_ids"}
        input_ids = out["input_ids"]
        if "position_ids" not in out:
            out["position_ids"] = torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids).clone()
        if self.model_spec.name == "vlm":
            out["image_feature_index"] = image_feature_index(input_ids, self.model_args.image_token_id)
        return out

    def _context_parallel(self, batch: dict[str, torch.Tensor]):
        if self.dims.cp == 1:
            return contextlib.nullcontext()
        return context_parallel_micro_batch(self.dims.mesh_for("cp"), batch,
                                            self.config.parallelism.context_parallel_rotate_method)

    def _forward_loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of token cross-entropies of one micro-batch (labels IGNORE_INDEX do not count)."""
        inputs = batch["input_ids"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        extra = {}
        if self.config.training.document_masking or self.dims.cp > 1:
            extra["position_ids"] = batch["position_ids"].to(self.device, non_blocking=True)
            # A micro-batch of whole single documents needs no mask: plain causal attention is faster.
            if "document_ids" in batch and batch["document_ids"].max() > 0:
                extra["document_ids"] = batch["document_ids"].to(self.device, non_blocking=True)
        if "pixel_values" in batch:  # [tiles, 3, H, W]: all tiles of the micro-batch
            extra["pixel_values"] = batch["pixel_values"].to(self.device, non_blocking=True)
        if "image_feature_index" in batch:  # context parallel: which image embedding each image token takes
            extra["image_feature_index"] = batch["image_feature_index"]
        weights = None  # per-token loss weights of multimodal.loss_scaling = "sqrt_length"
        if "loss_weights" in batch:
            weights = batch["loss_weights"].to(self.device, non_blocking=True)
        with self.mixed_precision:
            if self.loss_in_output_layer:  # weights is None: validated at load
                return self.model(inputs, labels=labels, **extra)
            logits = self.model(inputs, **extra)
        return self.loss_fn(logits, labels, weights)

    def _pipeline_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss of one microbatch: its summed token cross-entropy times the step's normalisation
        (what the non-pipelined step backpropagates). `target`: labels, or [..., 2] labels and loss weights."""
        if target.is_floating_point():
            return self.loss_fn(logits, target[..., 0].long(), target[..., 1]) * self.pp_loss_scale
        return self.loss_fn(logits, target) * self.pp_loss_scale

    def _pipeline_forward_backward(self, batch: dict[str, torch.Tensor], scale: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one micro-batch through the pipeline schedule, which splits it into
        microbatches. Returns the sum of its token cross-entropies on the rank holding the last stage, 0 elsewhere.

        The token ids (and images) go to the first stage only; position ids (always given: a stage's
        hidden states may be split on the sequence) and document ids go to every stage as keyword
        arguments, split into microbatches along with the batch.
        """
        input_ids = batch["input_ids"].to(self.device, non_blocking=True)
        args = (input_ids,)
        if self.config.training.document_masking:
            kwargs = {"position_ids": batch["position_ids"].to(self.device, non_blocking=True)}
            if batch["document_ids"].max() > 0:
                kwargs["document_ids"] = batch["document_ids"].to(self.device, non_blocking=True)
        else:
            kwargs = {"position_ids": torch.arange(input_ids.shape[1], device=self.device).expand_as(input_ids)}
        if "pixel_values" in batch:  # regrouped by sample [B, N, 3, H, W] to be split like the tokens
            pixel_values, tile_mask = tiles_by_sample(batch["pixel_values"], batch["tiles_per_sample"])
            args += (pixel_values.to(self.device, non_blocking=True),)
            kwargs["tile_mask"] = tile_mask.to(self.device, non_blocking=True)
        # The schedule splits one target tensor: loss weights travel with the labels as [B, S, 2] floats.
        target = batch["labels"].to(self.device, non_blocking=True)
        if "loss_weights" in batch:
            target = torch.stack([target.float(), batch["loss_weights"].to(self.device, non_blocking=True)], dim=-1)
        losses = []
        self.pp_loss_scale = scale
        self.pp_schedule.step(*(args if self.pp_has_first_stage else ()),
                              target=target if self.pp_has_last_stage else None,
                              losses=losses if self.pp_has_last_stage else None, return_outputs=False, **kwargs)
        if not losses:
            return torch.zeros((), device=self.device)
        losses = [loss.detach().full_tensor() if isinstance(loss, DTensor) else loss.detach() for loss in losses]
        return torch.stack(losses).sum() / scale

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward/backward over this rank's micro-batches and one optimizer step (skipped on the device when
        the loss or the gradient norm is not finite). Returns (loss, grad_norm) as device scalars: read them
        through `settle_steps`, which also counts the skipped steps."""
        # Trained tokens, or the sum of the per-token loss weights (multimodal.loss_scaling = "sqrt_length").
        local_count = sum(float(mb["loss_weights"].sum()) if "loss_weights" in mb else
                          int((mb["labels"] != IGNORE_INDEX).sum()) for mb in micro_batches)
        dp_cp_mesh = self.dims.mesh_for("dp_cp")
        dp_cp_group = dp_cp_mesh.get_group()
        # The cp ranks of a data-parallel rank hold the same micro-batches: count their tokens once.
        # torch.full fills on the device: a tensor copied from host memory would wait for the previous step.
        global_count = all_reduce(torch.full((), float(local_count), device=self.device), group=dp_cp_group)
        global_count = global_count / self.dims.cp
        # FSDP averages gradients over the dp x cp ranks; multiplying back makes the gradient
        # that of (sum of token losses of the global batch) / (trained tokens of the global batch).
        scale = dp_cp_mesh.size() / global_count.clamp(min=1.0)
        loss_sum = torch.zeros((), device=self.device)
        for mb in micro_batches:
            if self.pp_schedule is not None:
                with self._loss_parallel():
                    loss_sum += self._pipeline_forward_backward(mb, scale)
                continue
            if self.dims.cp > 1:
                mb = self._context_parallel_batch(mb)
            with self._loss_parallel(), self._context_parallel(mb):
                mb_loss = self._forward_loss_sum(mb)
                (mb_loss * scale).backward()
            loss_sum += mb_loss.detach().full_tensor() if isinstance(mb_loss, DTensor) else mb_loss.detach()
        if self.pp_schedule is not None:  # only the last stage has the loss
            loss_sum = all_reduce(loss_sum, group=self.dims.mesh_for("pp").get_group())
        loss_t = all_reduce(loss_sum, group=dp_cp_group) / global_count.clamp(min=1.0)
        params = [p for part in self.model_parts for p in part.parameters() if p.grad is not None]
        events = self._record_optimizer_start()
        grad_norm_t = None if self.backward_grad_norm is None else self.backward_grad_norm.total(params)
        if grad_norm_t is None:
            pp_mesh = self.dims.mesh_for("pp") if self.dims.pp > 1 else None
            grad_norm_t = clip_grad_norm_(params, 0.0, pp_mesh=pp_mesh)
        skipped = clipped_step(self.optimizers, params, loss_t, grad_norm_t, self.config.training.max_norm)
        for optimizer, scheduler in zip(self.optimizers, self.schedulers):
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        if events is not None:
            events[1].record()
            self._optimizer_events.append(events)
        self._unsettled.append((self.train_state.step + 1, loss_t, grad_norm_t, skipped))
        return loss_t, grad_norm_t

    def _build_gather_during_optimizer(self) -> GatherDuringOptimizer | None:
        """parallelism.fsdp_gather_during_optimizer, where it applies (an FSDP2 language model, one stage, the
        compiled optimizer)."""
        if not self.config.parallelism.fsdp_gather_during_optimizer:
            return None
        units = first_forward_units(self.model_parts[0]) if len(self.model_parts) == 1 else []
        if self.dims.pp > 1 or self.config.optimizer.implementation != "compiled" or not units:
            logger.info("parallelism.fsdp_gather_during_optimizer: needs an FSDP2 language model in one stage and "
                        "optimizer.implementation = compiled; the first all-gathers follow the step")
            return None
        gather = GatherDuringOptimizer(units, self.optimizers)
        return gather if gather.units else None

    def _build_backward_grad_norm(self) -> BackwardGradNorm | None:
        """training.grad_norm_in_backward's hooks, where the layout allows them (FSDP2, without PP)."""
        if not self.config.training.grad_norm_in_backward:
            return None
        trainable = [p for part in self.model_parts for p in part.parameters() if p.requires_grad]
        fsdp = any(isinstance(m, FSDPModule) for part in self.model_parts for m in part.modules())
        if self.dims.pp > 1 or not fsdp or not BackwardGradNorm.supports(trainable):
            logger.info("training.grad_norm_in_backward: needs FSDP2 (with HSDP or TP, not pipeline parallelism); "
                        "the gradient norm is computed after backward")
            return None
        return BackwardGradNorm(trainable)

    def _record_optimizer_start(self) -> tuple[torch.cuda.Event, torch.cuda.Event] | None:
        if self.device.type != "cuda":
            return None
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record()
        return events

    def pop_optimizer_ms(self) -> dict[str, float]:
        """{"optimizer_ms": mean device milliseconds of the optimizer phase (gradient norm, clipping, step,
        zeroing) over the steps since the last call}, read after `settle_steps` (the events have completed);
        empty off CUDA. Measured in place, it is what the profile's optimizer kernels cost, without the profiler."""
        events, self._optimizer_events = self._optimizer_events, []
        if not events:
            return {}
        return {"optimizer_ms": round(sum(start.elapsed_time(end) for start, end in events) / len(events), 2)}

    def settle_steps(self) -> list[tuple[float, float]]:
        """(loss, grad_norm) of the steps run since the last call, read from the device in one synchronisation.

        A step whose loss or gradient norm was not finite was skipped on the device (`optim.clipped_step`);
        here it is counted and logged, and `NonFiniteError` is raised once training.max_consecutive_nonfinite
        of them came in a row. The trainer settles at every logged step, before every checkpoint and at the
        end, so the counts it saves and reports are exact; in between the host never waits for the device.
        """
        if not self._unsettled:
            return []
        steps = [step for step, *_ in self._unsettled]
        device = self._unsettled[0][1].device
        values = torch.stack([torch.stack([loss.float(), norm.float().to(device), skipped.to(device)])
                              for _, loss, norm, skipped in self._unsettled]).tolist()
        self._unsettled.clear()
        state, limit = self.train_state, self.config.training.max_consecutive_nonfinite
        for step, (loss, grad_norm, skipped) in zip(steps, values):
            if not skipped:
                state.consecutive_nonfinite_skips = 0
                continue
            state.consecutive_nonfinite_skips += 1
            state.total_nonfinite_skips += 1
            if self.rank == 0:
                logger.warning(f"step {step}: non-finite loss {loss} or grad norm {grad_norm}; "
                               f"optimizer step skipped ({state.consecutive_nonfinite_skips} in a row)")
            if state.consecutive_nonfinite_skips >= limit:
                raise NonFiniteError(
                    f"{state.consecutive_nonfinite_skips} consecutive steps with a non-finite loss or gradient "
                    f"(training.max_consecutive_nonfinite = {limit}), the last at step {step}; stopping. "
                    "The last good checkpoint is intact.")
        return [(loss, grad_norm) for loss, grad_norm, _ in values]

    def data_wait_pct(self, data_seconds: float, window_seconds: float) -> float:
        """The share (%) of a log window the host spent waiting for its next batch, on the slowest rank (a
        collective). The host runs ahead of the GPU, so this bounds the GPU time lost to the data loader."""
        slowest = all_reduce(torch.tensor(data_seconds, dtype=torch.float64, device=self.device),
                             op=dist.ReduceOp.MAX).item()
        return round(100 * slowest / window_seconds, 3) if window_seconds > 0 else 0.0

    def train(self) -> list[float]:
        """Run to training.steps; returns the losses of the steps run by this call."""
        cfg = self.config
        gc.disable()
        losses = []
        tokens_since_log, time_last_log, data_seconds = 0, time.perf_counter(), 0.0
        self.profiler.start(self.train_state.step)
        try:
            while self.train_state.step < cfg.training.steps:
                step_index = self.train_state.step  # 0-based index of the step being run
                fetch_start = time.perf_counter()
                micro_batches = self.data.microbatches(step_index)
                data_seconds += time.perf_counter() - fetch_start
                lr = self.schedulers[0].get_last_lr()[0]
                if self.gather_during_optimizer is not None:
                    self.gather_during_optimizer.arm(step_index + 1 < cfg.training.steps)
                self.train_step(micro_batches)
                self.train_state.step += 1
                step = self.train_state.step
                tokens_since_log += self.tokens_per_micro_batch * len(micro_batches) * self.dp_degree
                eval_metrics, eval_seconds = self.online_eval.maybe_run(step)  # ({}, 0.0) unless an eval step
                time_last_log += eval_seconds  # evaluation time is not training throughput
                if step % cfg.training.gc_freq == 0:
                    gc.collect()
                last = step == cfg.training.steps
                log_now = step == 1 or step % cfg.metrics.log_freq == 0 or last or bool(eval_metrics)
                stop = self.preemption.should_stop()
                if log_now or stop or self.checkpoint.due(step, last=last or stop):
                    settled = self.settle_steps()  # waits for the device
                    losses += [loss for loss, _ in settled]
                if log_now:
                    loss, grad_norm = settled[-1]
                    now = time.perf_counter()
                    self.metrics.log(step, loss=loss, grad_norm=grad_norm, lr=lr,
                                     tokens=tokens_since_log // self.world_size, seconds=now - time_last_log,
                                     extra={"skipped_steps": self.train_state.total_nonfinite_skips,
                                            "data_wait_pct": self.data_wait_pct(data_seconds, now - time_last_log),
                                            **self.pop_optimizer_ms(),
                                            **eval_metrics,
                                            **(self.data.pop_metrics() if isinstance(self.data, VLMData) else {})})
                    tokens_since_log, time_last_log, data_seconds = 0, now, 0.0
                self.checkpoint.save(step, last=last or stop)
                self.profiler.step(step)
                if stop:
                    if self.rank == 0:
                        logger.warning(f"preemption signal: saved step {step}, exiting")
                    break
        except torch.OutOfMemoryError:
            self.profiler.out_of_memory()  # memory snapshot of the failed step
            raise
        finally:
            if self.gather_during_optimizer is not None:
                self.gather_during_optimizer.finish()
            self.profiler.stop()
            self.checkpoint.close()
            self.metrics.close()
            self.preemption.close()
            gc.enable()
        return losses


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="[titanmm %(asctime)s] %(message)s", datefmt="%H:%M:%S")
    # Before CUDA starts: segments that grow in place instead of new blocks per size keep the caching
    # allocator from fragmenting as activation sizes vary (torchtitan's launcher sets the same).
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    config_path, overrides, print_config = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        config = load_config(config_path, overrides, world_size=world_size)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if print_config:
        print(format_config(config))
        return 0
    trainer = Trainer(config)
    try:
        trainer.train()
    finally:
        # FSDP2's modules and their states form reference cycles that keep the process groups alive: collect them
        # while the interpreter is whole, not during its shutdown (where gloo's threads can abort the process).
        del trainer
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
