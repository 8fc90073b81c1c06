"""FP8 (torchao float8): which layers are converted, config checks, and emulated-FP8 training on CPU layouts.

Real FP8 matmuls need an H100/H200 (tests/gpu/test_gpu_float8.py); here torchao's emulation runs the same
casts and scaling in high precision, so the layouts (FSDP2 with FP8 all-gather, TP, resume) are checked
against the single-process run as for bf16.
"""

import shutil

import pytest
import torch
from torch import nn

pytest.importorskip("torchao.float8")

from titanmm.config import load_config  # noqa: E402
from titanmm.config.job_config import Float8  # noqa: E402
from titanmm.config.loader import ConfigError  # noqa: E402
from titanmm.models import get_model_spec  # noqa: E402
from titanmm.parallel.float8 import (convert_to_float8, float8_tp_enabled, for_shard_degree,  # noqa: E402
                                    matches_fqn, uses_float8_all_gather)
from tests.utils import REPO, logged, run_training  # noqa: E402

DEBUG = str(REPO / "train_configs" / "debug_llama.toml")
COMMON = ["--training.steps=4", "--training.seq_len=128", "--training.global_batch_size=8",
          "--lr_scheduler.warmup_steps=2", "--float8.enable=true", "--float8.emulate=true"]


def test_matches_fqn_by_path_component():
    assert matches_fqn("output", ["output"]) and matches_fqn("lm.output", ["output"])
    assert matches_fqn("vision.blocks.0.attn.qkv", ["vision"])
    assert not matches_fqn("lm.layers.0.attention.wo", ["output", "w"])
    assert matches_fqn("vision.patch_embed", ["patch_embed"])


def test_conversion_skips_head_patch_embedding_and_odd_shapes():
    from torchao.float8.float8_linear import Float8Linear

    spec = get_model_spec("vlm")
    with torch.device("meta"):
        model = spec.model_cls(spec.flavors["debug_vlm_radio"])  # its patch embedding is a Linear
        model.extra = nn.Linear(24, 32)  # 24 is not a multiple of 16
    converted = convert_to_float8(model, Float8(enable=True, emulate=True))
    assert "lm.output" not in converted and "vision.patch_embed" not in converted and "extra" not in converted
    assert isinstance(model.vision.patch_embed, nn.Linear) and not isinstance(model.vision.patch_embed, Float8Linear)
    lm_linears = [n for n, m in model.lm.layers.named_modules() if isinstance(m, nn.Linear)]
    assert lm_linears and all(isinstance(model.lm.layers.get_submodule(n), Float8Linear) for n in lm_linears)
    assert "projector.linear_1" in converted
    # The parameter names do not change: checkpoints stay interchangeable with bf16 runs.
    with torch.device("meta"):
        plain = spec.model_cls(spec.flavors["debug_vlm_radio"])
    assert {n for n, _ in plain.named_parameters()} == {n for n, _ in model.named_parameters()} - {
        "extra.weight", "extra.bias"}
    # Float8 TP styles only with real FP8 (CPU process groups cannot move float8 tensors).
    assert not float8_tp_enabled(model.lm.layers, Float8(enable=True, emulate=True))
    assert float8_tp_enabled(model.lm.layers, Float8(enable=True))
    assert not float8_tp_enabled(model.lm.layers, Float8(enable=True, recipe="rowwise"))


def test_no_float8_all_gather_without_sharding():
    """One FSDP2 shard: the float8 all-gather is off (it would only move the weight cast out of the compiled
    blocks); with two or more it stays as configured."""
    config = Float8(enable=True)
    assert uses_float8_all_gather(config)
    single = for_shard_degree(config, 1)
    assert not single.enable_fsdp_float8_all_gather and not single.precompute_float8_dynamic_scale_for_fsdp
    assert for_shard_degree(config, 2) is config
    rowwise = Float8(enable=True, recipe="rowwise")
    assert for_shard_degree(rowwise, 1) is rowwise


def test_mix_order_reduction_off_under_float8():
    """compile.mix_order_reduction = "auto" turns inductor's mix-order reduction off for FP8 runs only (it fused
    the transposed FP8 casts into RMSNorm's backward, ~2 ms per block on an H100); "on"/"off" force it."""
    from titanmm.parallel.compile import mix_order_reduction_enabled, set_mix_order_reduction

    assert not mix_order_reduction_enabled("auto", float8=True) and mix_order_reduction_enabled("auto", float8=False)
    assert mix_order_reduction_enabled("on", float8=True) and not mix_order_reduction_enabled("off", float8=False)
    triton_config = torch._inductor.config.triton
    if not hasattr(triton_config, "mix_order_reduction"):
        pytest.skip("this torch has no mix-order reduction")
    with torch._inductor.config.patch({"triton.mix_order_reduction": True}):
        set_mix_order_reduction(False)
        assert triton_config.mix_order_reduction is False
    assert load_config(DEBUG, ["--float8.enable=true"]).compile.mix_order_reduction == "auto"


@pytest.mark.parametrize("overrides, message", [
    (["--float8.recipe=blockwise"], "float8.recipe = 'blockwise'"),
    (["--float8.backend=te"], "Transformer Engine is not offered"),
    (["--compile.mix_order_reduction=sometimes"], "compile.mix_order_reduction"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEBUG, overrides)


@pytest.mark.slow
def test_emulated_float8_layouts_match_single_process(tmp_path):
    """tensorwise: 1 rank == FSDP2 x 2 (FP8 all-gather + precomputed scales, the fused cast), and a resume from
    step 2 on FSDP2 continues the same losses; rowwise: 1 rank == TP 2. FP8 emulation stays within 1e-3 of
    float32."""
    runs = {
        "fp32": (1, ["--training.local_batch_size=4", "--float8.enable=false"]),
        "tensorwise_1": (1, ["--training.local_batch_size=4"]),
        "tensorwise_fsdp2": (2, ["--training.local_batch_size=4", "--checkpoint.enable=true",
                                 "--checkpoint.interval=2", "--float8.fused_all_gather_cast=true"]),
        "rowwise_1": (1, ["--training.local_batch_size=4", "--float8.recipe=rowwise"]),
        "rowwise_tp2": (2, ["--training.local_batch_size=8", "--float8.recipe=rowwise",
                            "--parallelism.tensor_parallel_degree=2"]),
    }
    losses = {}
    for name, (nproc, overrides) in runs.items():
        run_training(nproc, tmp_path / name, COMMON + overrides)
        losses[name] = logged(tmp_path / name)
    for step, ref in losses["fp32"].items():
        assert abs(losses["tensorwise_1"][step] - ref) <= 1e-3 * ref
    for single, layout in (("tensorwise_1", "tensorwise_fsdp2"), ("rowwise_1", "rowwise_tp2")):
        for step, ref in losses[single].items():
            assert abs(losses[layout][step] - ref) <= 1e-5 * ref, (layout, step, losses[layout][step], ref)

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "tensorwise_fsdp2" / "checkpoint" / "step-2", resumed / "checkpoint" / "step-2")
    run_training(2, resumed, COMMON + runs["tensorwise_fsdp2"][1])
    after = logged(resumed)
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        assert abs(after[step] - losses["tensorwise_fsdp2"][step]) <= 1e-6 * after[step]

    # The checkpoint holds plain tensors, not the FP8 weights' wrapper classes (pickled by class path, they
    # would load only where that class is importable and allowlisted): a run without FP8 resumes from it.
    for shard in (resumed / "checkpoint" / "step-2").glob("*.distcp"):
        assert b"Float8AllGatherWeight" not in shard.read_bytes() and b"fsdp_utils" not in shard.read_bytes()
    plain = tmp_path / "plain_from_fp8"
    shutil.copytree(resumed / "checkpoint" / "step-2", plain / "checkpoint" / "step-2")
    run_training(2, plain, COMMON + ["--float8.enable=false"] + runs["tensorwise_fsdp2"][1])
    from_fp8 = logged(plain)
    assert sorted(from_fp8) == [3, 4]
    assert abs(from_fp8[3] - after[3]) <= 1e-3 * after[3]  # the same weights, matmuls no longer FP8-emulated
