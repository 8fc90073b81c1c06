"""Optimizer, learning-rate schedule and gradient clipping.

* :func:`build_optimizer` - AdamW/Adam over the trainable parameters of all model parts, with weight
  decay on matrices/embeddings only, fused/foreach/for-loop kernels or a compiled one
  (titanmm.compiled_adamw), DTensor (FSDP2/TP) parameters.
* :func:`build_lr_scheduler` / :func:`lr_at` - linear warm-up then cosine, linear, constant or
  warmup-stable-decay (wsd).
* :func:`clip_grad_norm_` - global L2 gradient norm over plain tensors and DTensors, optional
  all-reduce over pipeline stages, clipping that never scales by NaN.
* :func:`clipped_step` - the optimizer step after the norm: clipping and the skip of a non-finite step
  folded into torch's fused Adam(W) kernel (no host synchronisation), or done separately otherwise.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from titanmm.config.job_config import LRScheduler, Optimizer

logger = logging.getLogger(__name__)

_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
_IMPLEMENTATIONS = ("fused", "foreach", "for-loop", "compiled")
_DECAY_TYPES = ("cosine", "linear", "constant", "wsd")


# --------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------


def trainable_parameters(model_parts: list[nn.Module]) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` of all model parts, each once (tied weights are shared)."""
    seen: set[int] = set()
    params = []
    for part in model_parts:
        for p in part.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def param_groups(model_parts: list[nn.Module], weight_decay: float) -> list[dict]:
    """Weight decay for tensors with ndim >= 2 (matrices, embeddings), none for norms and biases
    (ndim < 2); within each, one group per device mesh (plain tensors apart), because fused and
    foreach kernels cannot mix plain tensors and DTensors of different meshes."""
    groups: dict[tuple, dict] = {}
    for p in trainable_parameters(model_parts):
        decay = weight_decay if p.ndim >= 2 else 0.0
        mesh = p.device_mesh if isinstance(p, DTensor) else None
        groups.setdefault((decay, id(mesh)), {"params": [], "weight_decay": decay})["params"].append(p)
    return list(groups.values())


def _local_device(p: torch.Tensor) -> torch.device:
    return p.to_local().device if isinstance(p, DTensor) else p.device


def fused_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether every parameter lives on a device (and has a dtype) with a fused Adam kernel."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # private helper: be conservative if it moves
        devices = {"cuda"}
    return all(
        _local_device(p).type in devices and torch.is_floating_point(p) for p in params
    )


def _kernel_kwargs(implementation: str, params: list[torch.Tensor]) -> dict:
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"optimizer.implementation must be one of {_IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "fused":
        if fused_supported(params):
            return {"fused": True, "foreach": False}
        logger.warning("fused optimizer kernels are not available for these parameters; using foreach")
        implementation = "foreach"
    if implementation == "foreach":
        return {"fused": False, "foreach": True}
    return {"fused": False, "foreach": False}


def build_optimizer(model_parts: list[nn.Module], config: Optimizer) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or Adam (L2 penalty) over the trainable parameters.

    Frozen parameters (``requires_grad=False``) get no state; tied parameters appear once.
    ``implementation="fused"`` falls back to foreach when a parameter's device has no fused kernel
    (or the optimizer refuses it); works on plain tensors and DTensors (FSDP2 / TP).
    """
    cls = _OPTIMIZERS.get(config.name.lower())
    if cls is None:
        raise ValueError(f"optimizer.name must be AdamW or Adam, got {config.name!r}")
    groups = param_groups(model_parts, config.weight_decay)
    if not groups:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    kwargs = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps)
    if config.implementation == "compiled":
        from titanmm.compiled_adamw import CompiledAdamW

        return CompiledAdamW(groups, **kwargs, decoupled=cls is torch.optim.AdamW)
    kernel = _kernel_kwargs(config.implementation, params)
    try:
        return cls(groups, **kwargs, **kernel)
    except RuntimeError as e:
        if not kernel["fused"]:
            raise
        logger.warning("fused %s refused (%s); using foreach", cls.__name__, e)
        return cls(groups, **kwargs, fused=False, foreach=True)


# --------------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------------


def lr_at(step: int, config: LRScheduler, peak_lr: float, training_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based, as the trainer counts: 1..training_steps).

    With W = warmup_steps, T = training_steps, peak = peak_lr, m = min_lr, k = clamp(step, 1, T):

    * warm-up, k <= W:  ``lr = peak * k / W``  (step 1 uses peak / W > 0; step W uses peak)
    * after warm-up, with progress ``p = (k - W) / (T - W)`` (0 at step W, 1 at step T):

      - cosine:   ``lr = m + (peak - m) * (1 + cos(pi * p)) / 2``
      - linear:   ``lr = m + (peak - m) * (1 - p)``
      - constant: ``lr = peak``
      - wsd:      D = round(decay_ratio * T) decay steps, start S = max(W, T - D):
                  ``lr = peak`` for k <= S, then ``lr = m + (peak - m) * (1 - (k - S) / (T - S))``

    Every decaying schedule reaches ``m`` exactly at step T (and stays there beyond T).
    """
    if config.decay_type not in _DECAY_TYPES:
        raise ValueError(f"lr_scheduler.decay_type must be one of {_DECAY_TYPES}, got {config.decay_type!r}")
    total = max(int(training_steps), 1)
    warmup = max(int(config.warmup_steps), 0)
    k = min(max(int(step), 1), total)
    if k <= warmup:
        return peak_lr * k / warmup
    lo = config.min_lr
    if config.decay_type == "constant":
        return peak_lr
    if config.decay_type == "wsd":
        start = max(warmup, total - int(round(config.decay_ratio * total)))
        if k <= start:
            return peak_lr
        return lo + (peak_lr - lo) * (1.0 - (k - start) / (total - start))
    progress = (k - warmup) / (total - warmup)
    if config.decay_type == "cosine":
        return lo + (peak_lr - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lo + (peak_lr - lo) * (1.0 - progress)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: LRScheduler, training_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR following :func:`lr_at`, relative to each group's initial lr (the peak).

    LambdaLR calls the lambda with ``last_epoch`` = number of ``scheduler.step()`` calls so far,
    so the i-th optimizer step (1-based) uses ``lr_at(i)`` when the trainer calls
    ``scheduler.step()`` after each ``optimizer.step()``. ``min_lr`` is absolute, i.e. its factor is
    ``min_lr / lr``. The lambda is a plain function: ``state_dict()`` stores no callable (only
    ``last_epoch``, ``base_lrs`` and the like), and the schedule itself always comes from the config.
    """
    lambdas = []
    for group in optimizer.param_groups:
        peak = group.get("initial_lr", group["lr"])
        lambdas.append(_make_lambda(config, peak, training_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _make_lambda(config: LRScheduler, peak_lr: float, training_steps: int):
    lr_at(1, config, peak_lr, training_steps)  # validate the config now, not at the first step

    def factor(last_epoch: int) -> float:
        if peak_lr == 0:
            return 0.0
        return lr_at(last_epoch + 1, config, peak_lr, training_steps) / peak_lr

    return factor


# --------------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------------


def _group_norm(grads: list[torch.Tensor], norm_type: float, foreach: bool | None) -> torch.Tensor:
    norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite=False, foreach=foreach)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def _by_mesh(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Tensors grouped by device mesh (plain tensors by device): foreach kernels take one kind at a time."""
    groups: dict[object, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.device_mesh if isinstance(t, DTensor) else t.device, []).append(t)
    return list(groups.values())


def total_grad_norm(
    grads: list[torch.Tensor], norm_type: float = 2.0, foreach: bool | None = None
) -> torch.Tensor:
    """Norm of all ``grads`` as one vector; DTensors are reduced over their mesh.

    Gradients are grouped by device mesh (plain tensors form one group) so that parameters under
    different meshes (e.g. FSDP-only and FSDP+TP) can be mixed; the group norms are then combined.
    """
    norms = [_group_norm(gs, norm_type, foreach) for gs in _by_mesh(grads)]
    if len(norms) == 1:
        return norms[0]
    device = norms[0].device
    return torch.nn.utils.get_total_norm([n.to(device) for n in norms], norm_type, foreach=foreach)


def _reduce_over_group(norm: torch.Tensor, norm_type: float, group) -> torch.Tensor:
    """Combine per-stage norms over a process group (pipeline stages hold disjoint parameters)."""
    if math.isinf(norm_type):
        dist.all_reduce(norm, op=dist.ReduceOp.MAX, group=group)
        return norm
    norm = norm**norm_type
    dist.all_reduce(norm, op=dist.ReduceOp.SUM, group=group)
    return norm ** (1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Iterable[torch.Tensor] | torch.Tensor,
    max_norm: float,
    foreach: bool | None = None,
    *,
    norm_type: float = 2.0,
    pp_mesh=None,
    pp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Clip gradients to a global ``norm_type`` norm of ``max_norm``; return the total norm.

    Works with plain tensors and DTensors (FSDP2 / TP shards; the norm is a plain tensor, the
    full-mesh value). ``pp_mesh`` (a 1-D DeviceMesh) or ``pp_group`` combines the norm across
    pipeline stages. ``max_norm <= 0`` only computes the norm. A non-finite norm is returned as is
    and the gradients are left untouched (no host sync: the clip coefficient becomes 1), so the
    trainer can skip the step.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in params]
    group = pp_mesh.get_group() if pp_mesh is not None else pp_group
    if grads:
        total = total_grad_norm(grads, norm_type, foreach)
    else:  # e.g. a pipeline stage without trainable parameters still joins the reduction
        cuda = group is not None and dist.get_backend(group) == "nccl"
        total = torch.zeros((), device="cuda" if cuda else "cpu")
    if group is not None:
        total = _reduce_over_group(total, norm_type, group)
    if max_norm > 0:
        _clip_grads_(params, max_norm, total, foreach)
    return total


def _clip_grads_(params: list[torch.Tensor], max_norm: float, total: torch.Tensor, foreach: bool | None = None):
    """Scale the gradients by min(max_norm / (total + 1e-6), 1); a non-finite total leaves them alone."""
    safe = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    for group_params in _by_mesh(params):
        torch.nn.utils.clip_grads_with_norm_(group_params, max_norm, safe, foreach=foreach)


# --------------------------------------------------------------------------------------------
# The optimizer step
# --------------------------------------------------------------------------------------------


def steps_on_device(optimizers: list[torch.optim.Optimizer]) -> bool:
    """Whether every optimizer runs torch's fused Adam(W) kernel or titanmm's compiled one
    (`titanmm.compiled_adamw`), which divide the gradients by a device scalar (``grad_scale``) and skip the
    update when a device flag (``found_inf``) is set: then clipping and the skip of a non-finite step need
    no host synchronisation."""
    return bool(optimizers) and all(o.defaults.get("fused") or getattr(o, "steps_on_device", False)
                                    for o in optimizers)


@torch.no_grad()
def clipped_step(
    optimizers: list[torch.optim.Optimizer],
    params: list[torch.Tensor],
    loss: torch.Tensor,
    grad_norm: torch.Tensor,
    max_norm: float,
) -> torch.Tensor:
    """Step every optimizer with the gradients of `params` clipped to `max_norm` by their global norm
    `grad_norm` (from :func:`clip_grad_norm_` with ``max_norm=0``), unless `loss` or `grad_norm` is not
    finite. Returns the device flag: 1.0 when the step was skipped, else 0.0.

    With fused optimizers (:func:`steps_on_device`) the clip coefficient and the skip go into the
    kernel and nothing waits for the device, so the host can queue the next step while this one
    runs; the step counts of a skipped step are restored by torch, as for a mixed-precision
    gradient scaler's skipped step. Otherwise the gradients are scaled first and the host reads the
    flag to decide (one synchronisation). The two agree to float32 rounding: the fused kernel
    divides by the reciprocal coefficient instead of multiplying by it.
    """
    finite = torch.isfinite(loss).to(grad_norm.device) & torch.isfinite(grad_norm)
    skipped = (~finite).float()
    if not steps_on_device(optimizers):
        if max_norm > 0:
            _clip_grads_(params, max_norm, grad_norm)
        if not skipped.item():
            for optimizer in optimizers:
                optimizer.step()
        return skipped
    grad_scale = None
    if max_norm > 0:  # gradients / grad_scale == gradients * min(max_norm / (norm + 1e-6), 1)
        grad_scale = torch.clamp((grad_norm.float() + 1e-6) / max_norm, min=1.0)
        grad_scale = torch.where(finite, grad_scale, torch.ones_like(grad_scale))
    for optimizer in optimizers:
        optimizer.grad_scale, optimizer.found_inf = grad_scale, skipped  # read by Adam(W).step (fused)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    return skipped
