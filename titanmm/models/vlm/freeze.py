"""Freezing parts of a vision-language model (`model.freeze`): the training stages of LLaVA-style recipes.

    freeze(model, ["lm", "vision"])   # projector pretraining: only the projector trains

Runs on the meta-device model, before parallelism: `requires_grad = False` survives tensor parallelism,
FSDP2 sharding (which reduce-scatters gradients of trainable parameters only, also inside a unit that
mixes frozen and trainable ones) and materialisation. Frozen parameters then get no gradient, the
optimizer is built over trainable parameters only (`optim.trainable_parameters`), so they have no
optimizer state and no checkpoint optimizer entry, and gradient clipping sees only trainable gradients.
Their weights are still saved and loaded with the model. A frozen vision tower whose inputs need no
gradient builds no autograd graph at all.
"""

from __future__ import annotations

from torch import nn

PARTS = ("lm", "vision", "projector")


def freeze(model: nn.Module, parts: list[str]) -> int:
    """Set requires_grad = False on every parameter of the named parts (of "lm", "vision", "projector", the
    attributes of a `VisionLanguageModel`); returns the number of parameters (elements) left trainable."""
    for name in parts:
        if name not in PARTS:
            raise ValueError(f"unknown model part {name!r} to freeze; expected some of {PARTS}")
        module = getattr(model, name, None)
        if module is None:  # e.g. a pipeline stage that does not hold this part
            continue
        for p in module.parameters():
            p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable
