"""titanmm.parallel.cast_cache: FSDP2's bfloat16 copy of each float32 shard, kept between all-gathers. The same
training as FSDP2's own cast, bit for bit (fused and compiled AdamW, a checkpoint-style in-place load), with one
cast per step, or none when the compiled optimizer writes the copy."""

import dataclasses

import pytest
import torch
from torch import nn

from tests.utils import free_port, gloo_process_group
from titanmm.parallel.cast_cache import CachedCastWeight, cache_param_casts


def test_wraps_float32_parameters_once_keeping_type_through_sharding_operations():
    model = nn.Sequential(nn.Linear(8, 6), nn.LayerNorm(6), nn.Linear(6, 8, bias=False))
    model[2].weight = nn.Parameter(model[0].weight.detach().t().contiguous())
    model[1].bias.requires_grad_(False)
    shared = nn.Linear(8, 8)
    model.append(shared)
    model.append(shared)  # one parameter object reached twice
    model.half_weight = nn.Parameter(torch.ones(3, dtype=torch.bfloat16))  # already in the compute dtype
    assert cache_param_casts(model, torch.bfloat16) == 7
    assert isinstance(model[3].weight, nn.Parameter) and isinstance(model[3].weight, CachedCastWeight)
    assert model[3].weight is model[4].weight and not model[1].bias.requires_grad
    assert not isinstance(model.half_weight, CachedCastWeight)
    weight = model[0].weight
    for result in (weight.detach(), torch.empty_like(weight), weight.view(-1), weight.clone(),
                   *torch.chunk(weight, 2), weight.new_zeros(2, 8)):
        assert type(result) is CachedCastWeight, result
    assert type(weight + 1) is torch.Tensor  # everything else computes on the float32 tensor
    model.to("meta").to_empty(device="cpu")
    assert isinstance(model[0].weight, CachedCastWeight)


class _Policy:
    param_dtype = torch.bfloat16


class _Mesh:
    ndim = 1

    def size(self, dim=None):
        assert dim in (None, 0)  # torch 2.11's DeviceMesh.size rejects -1
        return 4


def test_cast_once_per_change_with_fsdp2s_padding(monkeypatch):
    """10 rows over 4 shards: every all-gather input has ceil(10 / 4) = 3 rows; the last shard's 1 row is padded
    with zeros. The cast runs again only after an in-place write."""
    shard = torch.randn(10, 5)[9:]  # the last rank's shard, a view into its parameter
    weight = CachedCastWeight(shard, torch.bfloat16)
    copies = []
    original_copy = torch.Tensor.copy_
    (first,), _ = weight.fsdp_pre_all_gather(_Mesh(), torch.Size([10, 5]), (5, 1), None, _Policy())
    assert first.shape == (3, 5) and first.dtype == torch.bfloat16
    assert torch.equal(first[:1], shard.to(torch.bfloat16)) and not first[1:].any()
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, *a: copies.append(1) or original_copy(self, src, *a))
    (again,), _ = weight.fsdp_pre_all_gather(_Mesh(), torch.Size([10, 5]), (5, 1), None, _Policy())
    assert again is first and not copies
    shard.mul_(2)  # e.g. an optimizer step or a checkpoint load into the shard
    (after,), _ = weight.fsdp_pre_all_gather(_Mesh(), torch.Size([10, 5]), (5, 1), None, _Policy())
    assert after is first and len(copies) == 1 and torch.equal(after[:1], shard.to(torch.bfloat16))
    for write in (lambda: weight.add_(1), lambda: weight.view(-1).mul_(3)):  # through the wrapper, or a view of it
        write()
        (after,), _ = weight.fsdp_pre_all_gather(_Mesh(), torch.Size([10, 5]), (5, 1), None, _Policy())
        assert torch.equal(after[:1], shard.to(torch.bfloat16))
    assert len(copies) == 3
    weight.cast_buffer().fill_(0)
    weight.mark_cast_current()  # a writer that says it wrote the current values is trusted
    (trusted,), _ = weight.fsdp_pre_all_gather(_Mesh(), torch.Size([10, 5]), (5, 1), None, _Policy())
    assert not trusted.any() and len(copies) == 3


def _train(model_args, cache: bool, implementation: str, steps: int = 3) -> tuple[list[float], dict, int]:
    """FSDP2 over the group, bfloat16 compute, float32 reduction: (losses, full state, casts after step 1)."""
    from torch.distributed.device_mesh import init_device_mesh

    from titanmm.config.job_config import Optimizer
    from titanmm.models.llama import Transformer
    from titanmm.optim import build_optimizer
    from titanmm.parallel.fsdp import apply_fsdp

    torch.manual_seed(0)
    model = Transformer(model_args)
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    apply_fsdp(model, [model.layers], mesh, "bfloat16", "float32", lm=model, cache_param_casts=cache)
    assert cache == any(isinstance(p._local_tensor, CachedCastWeight) for p in model.parameters())
    optimizer = build_optimizer([model], Optimizer(implementation=implementation, lr=1e-2))
    generator = torch.Generator().manual_seed(torch.distributed.get_rank())
    losses, casts = [], [0]
    original = CachedCastWeight.fsdp_pre_all_gather

    def counted(self, mesh, outer_size, outer_stride, module, mp_policy):  # FSDP2 reads the signature
        before = self._cast_of
        out = original(self, mesh, outer_size, outer_stride, module, mp_policy)
        casts[0] += before != self._cast_of
        return out

    CachedCastWeight.fsdp_pre_all_gather = counted
    try:
        for step in range(steps):
            if step == 1:
                casts[0] = 0
                # a checkpoint load writes into the shards in place: the next all-gathers must see it
                with torch.no_grad():
                    model.norm.weight.to_local().add_(0.5)
            tokens = torch.randint(0, model_args.vocab_size, (2, 16), generator=generator)
            loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1).float(), tokens.roll(-1, 1).flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    finally:
        CachedCastWeight.fsdp_pre_all_gather = original
    state = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    return losses, state, casts[0]


def _worker(rank: int, world_size: int, port: int) -> None:
    from titanmm.models.llama import LLAMA_FLAVORS

    # 251 rows: FSDP2 pads the embedding's and the output layer's second shard
    args = dataclasses.replace(LLAMA_FLAVORS["debug"], n_layers=2, dim=64, n_heads=4, n_kv_heads=2,
                               ffn_hidden_dim=192, vocab_size=251)
    with gloo_process_group(rank, world_size, port):
        for implementation in ("fused", "compiled"):
            reference = _train(args, cache=False, implementation=implementation)
            cached = _train(args, cache=True, implementation=implementation)
            assert cached[0] == reference[0], (implementation, cached[0], reference[0])
            for name, value in reference[1].items():
                assert torch.equal(cached[1][name], value), (implementation, name)
            n_params = len(reference[1])
            # fused: one cast per parameter and step (forward; backward reuses it), the loaded norm's included;
            # compiled: only the loaded norm's, the update kernel writes the others' copies
            expected = 2 * n_params if implementation == "fused" else 1
            assert cached[2] == expected, (implementation, cached[2], expected)


def test_fsdp2_training_equals_fsdp2s_own_cast():
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)

