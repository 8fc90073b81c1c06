"""Tests of titanmm.optim: optimizer groups, lr schedules, gradient clipping (incl. FSDP2 on gloo)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from tests.utils import free_port, gloo_process_group
from titanmm.config.job_config import LRScheduler, Optimizer
from titanmm.optim import (build_lr_scheduler, build_optimizer, clip_grad_norm_, clipped_step, lr_at,
                           steps_on_device)

PEAK = 1e-3


class Tiny(nn.Module):
    def __init__(self, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8, bias=True)
        self.out = nn.Linear(8, 16, bias=False)
        if tie:
            self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(self.proj(self.norm(self.embed(x))))


# ------------------------------------------------------------------ learning-rate schedule


def _lrs(config: LRScheduler, steps: int) -> list[float]:
    return [lr_at(s, config, PEAK, steps) for s in range(1, steps + 1)]


def test_warmup_is_linear_and_starts_nonzero():
    cfg = LRScheduler(warmup_steps=4, decay_type="constant")
    lrs = _lrs(cfg, 10)
    assert lrs[:4] == pytest.approx([PEAK * k / 4 for k in (1, 2, 3, 4)])
    assert lrs[0] > 0
    assert lrs[4:] == pytest.approx([PEAK] * 6)


def test_cosine_ends_at_min_lr():
    cfg = LRScheduler(warmup_steps=10, decay_type="cosine", min_lr=1e-5)
    lrs = _lrs(cfg, 100)
    assert lrs[9] == pytest.approx(PEAK)
    assert lrs[-1] == pytest.approx(1e-5)
    mid = 10 + 45  # halfway through the decay
    assert lrs[mid - 1] == pytest.approx((PEAK + 1e-5) / 2)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(1000, cfg, PEAK, 100) == pytest.approx(1e-5)  # beyond the end: min_lr


def test_linear_decay():
    cfg = LRScheduler(warmup_steps=0, decay_type="linear", min_lr=0.0)
    lrs = _lrs(cfg, 4)
    assert lrs == pytest.approx([PEAK * 0.75, PEAK * 0.5, PEAK * 0.25, 0.0])


def test_wsd_plateau_then_linear_decay():
    cfg = LRScheduler(warmup_steps=5, decay_type="wsd", decay_ratio=0.2, min_lr=1e-4)
    lrs = _lrs(cfg, 50)  # decay over the last 10 steps: 41..50
    assert lrs[4] == pytest.approx(PEAK)
    assert lrs[5:40] == pytest.approx([PEAK] * 35)  # stable through step 40
    assert lrs[40] < PEAK  # step 41 starts decaying
    assert lrs[40] == pytest.approx(1e-4 + (PEAK - 1e-4) * 0.9)
    assert lrs[-1] == pytest.approx(1e-4)


def test_bad_decay_type():
    with pytest.raises(ValueError):
        lr_at(1, LRScheduler(decay_type="exp"), PEAK, 10)


def test_scheduler_matches_lr_at_and_round_trips():
    cfg = LRScheduler(warmup_steps=3, decay_type="cosine", min_lr=1e-5)
    opt = build_optimizer([Tiny()], Optimizer(lr=PEAK, implementation="for-loop"))
    sched = build_lr_scheduler(opt, cfg, training_steps=20)
    for step in range(1, 8):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, cfg, PEAK, 20))
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state["lr_lambdas"] == [None] * len(opt.param_groups)  # no callables saved
    assert not any(callable(v) for v in state.values())
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    opt2 = build_optimizer([Tiny()], Optimizer(lr=PEAK, implementation="for-loop"))
    sched2 = build_lr_scheduler(opt2, cfg, training_steps=20)
    sched2.load_state_dict(loaded)
    for o, s in ((opt, sched), (opt2, sched2)):
        o.step()
        s.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(9, cfg, PEAK, 20))


# ------------------------------------------------------------------ optimizer


def test_param_groups_decay_and_frozen():
    model = Tiny()
    model.norm.weight.requires_grad_(False)
    opt = build_optimizer([model], Optimizer(weight_decay=0.1, implementation="foreach"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([model.embed.weight, model.proj.weight, model.out.weight])
    assert ids(no_decay["params"]) == ids([model.norm.bias, model.proj.bias])
    model(torch.tensor([[1, 2]])).sum().backward()
    opt.step()
    assert model.norm.weight not in opt.state
    assert len(opt.state) == 5


def test_tied_params_once_across_parts():
    model = Tiny(tie=True)
    opt = build_optimizer([model, model.out], Optimizer(implementation="for-loop"))
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params})
    assert sum(p is model.embed.weight for p in params) == 1


@pytest.mark.parametrize("impl", ["fused", "foreach", "for-loop"])
def test_implementations_run_on_cpu(impl):
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer([model], Optimizer(implementation=impl))
    fused, foreach = opt.defaults["fused"], opt.defaults["foreach"]
    assert (bool(fused), bool(foreach)) == {
        "fused": (True, False), "foreach": (False, True), "for-loop": (False, False)
    }[impl]
    before = model.proj.weight.detach().clone()
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    assert not torch.equal(before, model.proj.weight)


@pytest.mark.parametrize("name", ["AdamW", "Adam"])
def test_implementations_agree(name):
    results = []
    for impl in ("fused", "foreach", "for-loop", "compiled"):
        torch.manual_seed(0)
        model = Tiny()
        opt = build_optimizer([model], Optimizer(name=name, implementation=impl))
        for _ in range(3):
            model(torch.tensor([[1, 2, 3]])).square().mean().backward()
            opt.step()
            opt.zero_grad()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0])


def test_bad_optimizer_config():
    with pytest.raises(ValueError):
        build_optimizer([Tiny()], Optimizer(name="SGD"))
    with pytest.raises(ValueError):
        build_optimizer([Tiny()], Optimizer(implementation="magic"))


# ------------------------------------------------------------------ gradient clipping


def _model_with_grads(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Tiny()
    model(torch.tensor([[1, 2, 3, 4]])).square().sum().backward()
    return model


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_matches_torch(max_norm):
    a, b = _model_with_grads(), _model_with_grads()
    ours = clip_grad_norm_(a.parameters(), max_norm)
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), max_norm)
    torch.testing.assert_close(ours, ref)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_clip_disabled_only_computes_norm():
    model = _model_with_grads()
    before = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm_(model.parameters(), 0.0)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in before]))
    torch.testing.assert_close(norm, expected)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), before))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_clip_nonfinite_returned_and_grads_untouched(bad):
    model = _model_with_grads()
    model.proj.bias.grad[0] = bad
    before = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm_(model.parameters(), 1.0)
    assert not torch.isfinite(norm)
    for p, g in zip(model.parameters(), before):
        if p is not model.proj.bias:
            assert torch.equal(p.grad, g)  # not scaled by NaN or 0


def test_clip_no_grads():
    assert clip_grad_norm_(Tiny().parameters(), 1.0).item() == 0.0


# ------------------------------------------------------------------ the clipped optimizer step


def _clipped_run(impl: str, max_norm: float, bad_steps=(), model: nn.Module | None = None):
    """Four steps of `clipped_step`; the loss of the steps in `bad_steps` (0-based) is NaN. Returns the
    model, the optimizer, the skip flags and the parameters after each step."""
    if model is None:
        torch.manual_seed(0)
        model = Tiny()
    opt = build_optimizer([model], Optimizer(implementation=impl))
    flags, snapshots = [], []
    for step in range(4):
        loss = model(torch.tensor([[1, 2, 3, step]])).square().mean()
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        norm = clip_grad_norm_(params, 0.0)
        reported = loss.detach() * float("nan") if step in bad_steps else loss.detach()
        flags.append(clipped_step([opt], params, reported, norm, max_norm).item())
        opt.zero_grad()
        snapshots.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return model, opt, flags, snapshots


@pytest.mark.parametrize("impl", ["fused", "compiled"])
@pytest.mark.parametrize("max_norm", [0.05, 1e6, 0.0])
def test_clipped_step_fused_on_device_equals_clip_then_step(max_norm, impl):
    """The fused (or compiled) kernel's grad_scale (1 / clip coefficient) gives what clipping the gradients and
    then stepping gives, to float32 rounding; the reference is the plain sequence with torch's own clip."""
    _, opt, flags, fused = _clipped_run(impl, max_norm)
    assert steps_on_device([opt]) and flags == [0.0] * 4
    torch.manual_seed(0)
    model = Tiny()
    ref_opt = build_optimizer([model], Optimizer(implementation="foreach"))
    assert not steps_on_device([ref_opt])
    for step in range(4):
        model(torch.tensor([[1, 2, 3, step]])).square().mean().backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        ref_opt.step()
        ref_opt.zero_grad()
        expected = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.testing.assert_close(fused[step], expected, rtol=1e-5, atol=1e-7)
    _, _, _, separate = _clipped_run("foreach", max_norm)  # the host-synchronising path
    torch.testing.assert_close(separate[-1], fused[-1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", ["fused", "foreach", "compiled"])
def test_clipped_step_skips_nonfinite_steps(impl):
    model, opt, flags, snapshots = _clipped_run(impl, 1.0, bad_steps={1, 2})
    assert flags == [0.0, 1.0, 1.0, 0.0]
    assert torch.equal(snapshots[0], snapshots[1]) and torch.equal(snapshots[1], snapshots[2])
    assert not torch.equal(snapshots[2], snapshots[3])
    steps = {float(state["step"]) for state in opt.state.values()}
    assert steps == {2.0}  # the skipped steps do not count for Adam's bias correction
    # Same as two good steps on the same data as steps 0 and 3.
    torch.manual_seed(0)
    ref = Tiny()
    ref_opt = build_optimizer([ref], Optimizer(implementation=impl))
    for step in (0, 3):
        ref(torch.tensor([[1, 2, 3, step]])).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        ref_opt.step()
        ref_opt.zero_grad()
    torch.testing.assert_close(snapshots[3], torch.cat([p.detach().flatten() for p in ref.parameters()]),
                               rtol=1e-5, atol=1e-7)


def test_compiled_state_moves_to_and_from_fused():
    """The compiled optimizer keeps torch's AdamW state: a state dict saved by either resumes in the other, and
    the next steps agree."""
    runs = {}
    for first, second in (("fused", "compiled"), ("compiled", "fused"), ("fused", "fused")):
        torch.manual_seed(0)
        model = Tiny()
        opt = build_optimizer([model], Optimizer(implementation=first))
        for step in range(2):
            model(torch.tensor([[1, 2, step]])).square().mean().backward()
            opt.step()
            opt.zero_grad()
        resumed = build_optimizer([model], Optimizer(implementation=second))
        resumed.load_state_dict(opt.state_dict())
        model(torch.tensor([[1, 2, 3]])).square().mean().backward()
        resumed.step()
        assert {float(state["step"]) for state in resumed.state.values()} == {3.0}
        runs[(first, second)] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(runs[("fused", "compiled")], runs[("fused", "fused")])
    torch.testing.assert_close(runs[("compiled", "fused")], runs[("fused", "fused")])


def test_compiled_update_is_one_graph_for_all_shapes():
    """The compiled update takes one flattened parameter with a dynamic length: the 5 shapes of Tiny (and a
    second step) reuse the graphs of the first parameters (one per weight decay), not one graph per shape."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = Tiny()
    opt = build_optimizer([model], Optimizer(implementation="compiled"))
    for step in range(2):
        model(torch.tensor([[1, 2, step]])).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_compiled_updates_wrapped_fp8_weights_in_place(monkeypatch):
    """A weight that is a tensor subclass wrapping a plain tensor (torchao's FP8 all-gather weight, here with a
    precomputed scale, which the compiler cannot fake) is updated through the tensor it wraps, as the fused
    kernel updates it, and is unwrapped once (its __tensor_flatten__ synchronises with the GPU)."""
    float8_fsdp = pytest.importorskip("torchao.float8.fsdp_utils")
    from torchao.float8.float8_training_tensor import LinearMMConfig

    real_flatten = float8_fsdp.WeightWithDynamicFloat8CastTensor.__tensor_flatten__
    results = []
    for impl in ("fused", "compiled"):
        torch.manual_seed(0)
        model = Tiny()
        initial = model.proj.weight.detach().clone()
        weight = initial.clone()
        model.proj.weight = nn.Parameter(float8_fsdp.WeightWithDynamicFloat8CastTensor(
            weight, LinearMMConfig(), torch.float8_e4m3fn, torch.tensor(2.0)))
        opt = build_optimizer([model], Optimizer(implementation=impl))
        flattened = []  # the subclass's __tensor_flatten__ reads its scale on the host: a GPU sync each time
        monkeypatch.setattr(float8_fsdp.WeightWithDynamicFloat8CastTensor, "__tensor_flatten__",
                            lambda self: flattened.append(1) or real_flatten(self))
        for step in range(3):
            model.proj.weight.grad = torch.full_like(weight, 0.1 * (step + 1))
            flattened.clear()
            opt.step()
        assert impl == "fused" or not flattened, "the compiled optimizer unwraps a weight once, not every step"
        assert isinstance(model.proj.weight.data, float8_fsdp.WeightWithDynamicFloat8CastTensor)
        results.append(model.proj.weight.detach()._tensor.clone())
    assert not torch.equal(results[1], initial)
    torch.testing.assert_close(results[1], results[0])


def test_clipped_step_leaves_no_scaler_attributes():
    _, opt, _, _ = _clipped_run("fused", 0.5, bad_steps={1})
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


# ------------------------------------------------------------------ FSDP2 on gloo (2 processes)


def _fsdp_worker(rank: int, world_size: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    with gloo_process_group(rank, world_size, port):
        tokens = torch.tensor([[1, 2, 3, 4, 5]])
        ref = _model_with_grads()  # same input on every rank: FSDP's averaged grads == these
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)

        torch.manual_seed(0)
        model = Tiny()
        fully_shard(model)
        model(torch.tensor([[1, 2, 3, 4]])).square().sum().backward()
        assert all(isinstance(p.grad, DTensor) for p in model.parameters())
        norm = clip_grad_norm_(model.parameters(), 0.1)
        assert not isinstance(norm, DTensor)
        assert abs(norm.item() - ref_norm.item()) <= 1e-6 * ref_norm.item(), (norm, ref_norm)
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad)

        opt = build_optimizer([model], Optimizer(implementation="fused"))
        assert opt.defaults["fused"]  # CPU fused AdamW accepts DTensor params
        opt.step()
        model(tokens).sum().backward()
        opt.step()
        opt.zero_grad()

        # the clipped step on the device (grad_scale / found_inf next to DTensor parameters) equals the
        # single-process one, for the fused and the compiled kernel
        for impl in ("fused", "compiled"):
            opt, ref_opt = (build_optimizer([m], Optimizer(implementation=impl)) for m in (model, ref))
            ref.load_state_dict({k: v.full_tensor() for k, v in model.state_dict().items()})
            ref_opt.zero_grad()
            for bad in (False, True, False):
                for m, o in ((model, opt), (ref, ref_opt)):
                    loss = m(tokens).square().mean()
                    loss.backward()
                    params = [p for p in m.parameters() if p.grad is not None]
                    clipped_step([o], params, loss.detach() * (float("nan") if bad else 1.0),
                                 clip_grad_norm_(params, 0.0), 0.05)
                    o.zero_grad()
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p.full_tensor(), q, rtol=1e-5, atol=1e-7)
            assert all(isinstance(state["exp_avg"], DTensor) for state in opt.state.values())

        # pipeline-stage reduction: every rank holds different (plain) parameters
        torch.manual_seed(100 + rank)
        w = nn.Parameter(torch.zeros(3))
        w.grad = torch.randn(3)
        gathered = [torch.zeros(3) for _ in range(world_size)]
        dist.all_gather(gathered, w.grad)
        expected = torch.linalg.vector_norm(torch.cat(gathered))
        got = clip_grad_norm_([w], 0.0, pp_group=dist.group.WORLD)
        torch.testing.assert_close(got, expected)


def test_clip_fsdp2_gloo_matches_single_process():
    import torch.multiprocessing as mp

    mp.spawn(_fsdp_worker, args=(2, free_port()), nprocs=2, join=True)


def test_lr_at_docstring_formula_cosine_midpoint():
    cfg = LRScheduler(warmup_steps=0, decay_type="cosine", min_lr=0.0)
    assert lr_at(5, cfg, 1.0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
