"""Activation checkpointing policies on the CPU: each gives the gradients of the unwrapped model, and recomputes
exactly the matmuls its policy says (counted at the aten level during backward)."""

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titanmm.models.llama import LLAMA_FLAVORS, Transformer
from titanmm.parallel.activation_checkpoint import apply_ac

MATMULS_PER_BLOCK = 7  # wq, wk, wv, wo, w1, w3, w2


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func == torch.ops.aten.mm.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode,option,all_matmuls_blocks,recomputed", [
    ("none", "op", -1, [0, 0, 0, 0]),
    ("selective", "op", -1, [3, 3, 3, 3]),  # the 2nd, 4th and 6th matmul of each block
    ("selective", "op_all_matmuls", -1, [0, 0, 0, 0]),
    ("selective", "op_all_matmuls", 1, [0, 3, 3, 3]),  # tuned per block: the first keeps every matmul output
    ("full", "op", -1, [MATMULS_PER_BLOCK - 1] * 4),  # recomputation stops early: w2's output is not needed
])
def test_policy_recomputes_its_matmuls_and_keeps_gradients(mode, option, all_matmuls_blocks, recomputed):
    torch.manual_seed(0)
    reference = Transformer(LLAMA_FLAVORS["debug"])
    reference.init_weights()
    assert reference.args.n_layers == len(recomputed)
    model = copy.deepcopy(reference)
    apply_ac([model.layers], mode, option, all_matmuls_blocks=all_matmuls_blocks)
    tokens = torch.randint(0, reference.args.vocab_size, (2, 16))
    reference(tokens).float().square().mean().backward()
    loss = model(tokens).float().square().mean()
    counter = CountMatmuls()
    with counter:
        loss.backward()
    n_layers = reference.args.n_layers
    # Backward of every matmul is two (input and weight gradients), plus the LM head's two.
    assert counter.count == 2 * (MATMULS_PER_BLOCK * n_layers + 1) + sum(recomputed)
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=name)
