"""Freezing parts of a vision-language model (`model.freeze`): the training stages of LLaVA-style recipes.

    freeze(model, ["lm", "vision"], dtype=torch.bfloat16)   # projector pretraining: only the projector trains

Runs on the meta-device model, before parallelism: `requires_grad = False` survives tensor parallelism
(`parallelize_vlm` restores it on the norms that SequenceParallel re-creates), FSDP2 sharding (which
reduce-scatters gradients of trainable parameters only, also inside a unit that mixes frozen and trainable
ones) and materialisation. Frozen parameters then get no gradient, the optimizer is built over trainable
parameters only (`optim.trainable_parameters`), so they have no optimizer state and no checkpoint optimizer
entry, and gradient clipping sees only trainable gradients. Their weights are still saved and loaded with
the model. A frozen vision tower whose inputs need no gradient builds no autograd graph at all.

Storage dtype, `training.frozen_params_dtype`: frozen weights are never updated, so they need no float32
master copy. By default ("param") they are stored in the compute dtype `training.mixed_precision_param`
(bfloat16 on GPU: a frozen 7B LM takes 15 GB instead of 30 GB; float32 on CPU, where nothing changes);
"bfloat16", "float16" or "float32" choose one explicitly. The dtype is set here, on the meta model, so the
weights materialise in it:
- FSDP2 casts every parameter to the compute dtype for forward/backward. Its rule of one original dtype per
  unit applies to trainable parameters only, so a unit may hold frozen bfloat16 and trainable float32 ones
  (the root: frozen embeddings and output layer, trainable projector). Frozen weights already in the compute
  dtype are all-gathered as they are: on GPU the loss and gradients are bitwise those of float32 frozen
  weights. Where some parameters are stored in another dtype than the compute dtype, FSDP2 is applied even
  to a single CPU rank, for that cast (`titanmm.parallel.parallelize.apply_ac_compile_fsdp`). On one GPU
  without parallelism torch.autocast replaces FSDP2 and reads the bfloat16 frozen weights as they are.
- `init_weights` draws every parameter in float32 and casts it (`titanmm.models.init.fill_`): a bfloat16
  weight is exactly the float32 initialisation rounded. HF loading (`load_hf_into_model`) casts alike.
- Checkpoints hold each parameter in its own dtype and DCP casts on load: a float32 checkpoint loads into
  bfloat16 frozen weights, and a stage-1 checkpoint (bfloat16 LM) into a stage-2 run training the LM in
  float32. `converters.export_hf --dtype keep` exports the mix as stored.
"""

from __future__ import annotations

import torch
from torch import nn

PARTS = ("lm", "vision", "projector")


def freeze(model: nn.Module, parts: list[str], dtype: torch.dtype | None = None) -> int:
    """Set requires_grad = False on every parameter of the named parts (of "lm", "vision", "projector", the
    attributes of a `VisionLanguageModel`) and, when `dtype` is given, store those parameters in it. Returns
    the number of parameters (elements) left trainable."""
    for name in parts:
        if name not in PARTS:
            raise ValueError(f"unknown model part {name!r} to freeze; expected some of {PARTS}")
        module = getattr(model, name, None)
        if module is None:  # e.g. a pipeline stage that does not hold this part
            continue
        for p in module.parameters():
            p.requires_grad_(False)
            if dtype is not None and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)  # the same Parameter object: tied weights stay tied
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable
