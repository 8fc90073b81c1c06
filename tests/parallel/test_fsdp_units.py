"""titanmm.parallel.fsdp: which modules become FSDP2 units (one CPU rank)."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from titanmm.models.llama import LLAMA_FLAVORS, Transformer
from titanmm.parallel.fsdp import apply_fsdp, lm_edge_units


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_and_output_layer_are_units_unless_tied(one_rank, tied):
    args = dataclasses.replace(LLAMA_FLAVORS["debug"], tie_word_embeddings=tied)
    with torch.device("meta"):
        model = Transformer(args)
    apply_fsdp(model, [model.layers], one_rank, "float32", "float32", lm=model)
    units = {name for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    blocks = {f"layers.{i}" for i in range(args.n_layers)}
    edges = set() if tied else {"tok_embeddings", "norm", "output"}  # norm + output: one unit of two modules
    assert units == {""} | blocks | edges
    if not tied:  # the output layer stays gathered after forward: backward starts with it
        assert model.output._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is None
        assert model.tok_embeddings._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None
    # Every block is resharded after forward, the last one too (as torchtitan: no extra gathered block at the peak).
    assert all(block._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None
               for block in model.layers.values())


def test_pipeline_stage_without_edges():
    stage = torch.nn.Module()
    stage.tok_embeddings, stage.norm, stage.output = None, None, torch.nn.Linear(4, 8)
    assert lm_edge_units(stage) == (None, [stage.output])
