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


def _gather_worker(rank: int, world_size: int, port: int) -> None:
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group
    from torch.distributed.tensor import DTensor

    from tests.utils import gloo_process_group
    from titanmm import compiled_adamw
    from titanmm.config.job_config import Optimizer
    from titanmm.optim import build_optimizer
    from titanmm.parallel.fsdp import GatherDuringOptimizer, first_forward_units, unit_parameters

    with gloo_process_group(rank, world_size, port):
        args = dataclasses.replace(LLAMA_FLAVORS["debug"], n_layers=2)
        torch.manual_seed(0)
        model = Transformer(args)
        apply_fsdp(model, [model.layers], init_device_mesh("cpu", (world_size,)), "float32", "float32", lm=model)
        optimizer = build_optimizer([model], Optimizer(implementation="compiled"))
        units = first_forward_units(model)
        assert units == [model, model.tok_embeddings, model.layers["0"]]
        gather = GatherDuringOptimizer(units, [optimizer])
        assert gather.units == [model.tok_embeddings, model.layers["0"]]  # the root holds no parameters
        first = {id(p) for u in gather.units for p in unit_parameters(u)}
        events = []
        update, all_gather = compiled_adamw._compiled_adam_update, _fsdp_param_group.foreach_all_gather

        def recorded_update(param, *args):
            events.append("update")
            return update(param, *args)

        def recorded_all_gather(fsdp_params, *args, **kwargs):
            events.append(("all-gather", {id(p.sharded_param) for p in fsdp_params} <= first))
            return all_gather(fsdp_params, *args, **kwargs)

        compiled_adamw._compiled_adam_update = recorded_update
        _fsdp_param_group.foreach_all_gather = recorded_all_gather
        try:
            tokens = torch.randint(0, args.vocab_size, (2, 16))
            for next_forward in (True, False):
                model(tokens).float().logsumexp(-1).mean().backward()
                events.clear()
                gather.arm(next_forward)
                optimizer.step()
                optimizer.zero_grad()
                n_first = len(first)
                if next_forward:  # the first units' updates, their two all-gathers, then every other update
                    assert events[:n_first] == ["update"] * n_first
                    assert events[n_first:n_first + 2] == [("all-gather", True)] * 2
                    assert events[n_first + 2:] == ["update"] * (len(list(model.parameters())) - n_first)
                    events.clear()
                    model(tokens)  # the forward waits for those two; it all-gathers the others itself
                    assert events.count(("all-gather", True)) == 0
                else:  # no forward follows the last step: nothing is gathered ahead
                    assert "update" in events and not any(isinstance(e, tuple) for e in events)
            # training stops right after an armed step: finish() waits for the all-gathers and frees them
            model(tokens).float().logsumexp(-1).mean().backward()
            gather.arm(True)
            optimizer.step()
            assert len(gather.pending) == 2
            gather.finish()
            assert not gather.pending and isinstance(model.tok_embeddings.weight, DTensor)  # resharded
            model(tokens)
        finally:
            compiled_adamw._compiled_adam_update = update
            _fsdp_param_group.foreach_all_gather = all_gather


def test_first_all_gathers_start_inside_the_optimizer_step():
    import torch.multiprocessing as mp

    from tests.utils import free_port

    mp.spawn(_gather_worker, args=(2, free_port()), nprocs=2, join=True)
