"""training.frozen_params_dtype: frozen parameters (model.freeze) stored in bfloat16 next to float32 trainable ones.

In-process: the cast on the meta model, init_weights, the config key, DCP loads across dtypes, HF loading.
One 1-process and one 2-process launch (this file is their worker): FSDP2 units mixing frozen bfloat16
and trainable float32 parameters (all-gather, forward, backward, reduce-scatter), and short trainings:
frozen bfloat16 ~= frozen float32, 2 processes (FSDP2, TP) == 1 process, a stage-1 checkpoint resumed by
stage 2, its HF export.
On CPU the compute dtype is float32, so the trainings ask for bfloat16 explicitly.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import titanmm
from titanmm.checkpoint import hf_mapping
from titanmm.checkpoint.hf_load import load_hf_into_model
from tests.utils import REPO, logged, run_env
from titanmm.config import load_config
from titanmm.config.loader import ConfigError
from titanmm.data import StepBatcher
from titanmm.data.mock_multimodal import MockMultimodalDataset
from titanmm.models import get_model_spec
from titanmm.models.vlm.freeze import freeze
from titanmm.parallel.parallelize import frozen_params_dtype

VLM_CONFIG = REPO / "train_configs" / "debug_vlm.toml"
ARGS = get_model_spec("vlm").flavors["debug_vlm"]
SEED = 42  # training.seed of debug_vlm.toml
COMMON = ["--training.steps=3", "--training.seq_len=96", "--training.global_batch_size=4",
          "--lr_scheduler.warmup_steps=1", "--metrics.log_freq=1", "--metrics.enable_tensorboard=false",
          "--metrics.plot_loss=false"]
STAGE1 = ["--model.freeze=lm,vision", "--training.local_batch_size=2"]
CKPT = ["--checkpoint.enable=true", "--checkpoint.interval=3"]


def _model(frozen_dtype: torch.dtype | None = None, parts=("lm", "vision"), seed: int = SEED):
    """debug_vlm built on meta, frozen (parts stored in `frozen_dtype` when given), materialised on CPU, initialised."""
    with torch.device("meta"):
        model = get_model_spec("vlm").model_cls(ARGS)
    if frozen_dtype is not None:
        freeze(model, list(parts), frozen_dtype)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed, buffer_device=torch.device("cpu"))
    return model


def _batch(n: int = 4, seq_len: int = 96):
    """The trainer's first global batch of mock data (as in tests/test_train_vlm.py)."""
    with torch.device("meta"):
        tokens = get_model_spec("vlm").model_cls(ARGS).tokens_per_tile(ARGS.image.tile_size, ARGS.image.tile_size)
    data = StepBatcher(MockMultimodalDataset(ARGS.lm.vocab_size, seq_len, ARGS.image_token_id, tokens,
                                             ARGS.image.tile_size, bos_id=ARGS.lm.bos_token_id, seed=SEED), n,
                       shuffle=False)
    (batch,) = data.microbatches(0)
    return batch


def _loss(model, batch) -> torch.Tensor:
    logits = model(batch["input_ids"], pixel_values=batch["pixel_values"].flatten(0, 1),
                   position_ids=batch["position_ids"])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)


# ------------------------------------------------------------------------------------------------ in-process


def test_freeze_casts_on_meta_and_init_is_the_float32_init_rounded():
    with torch.device("meta"):
        model = get_model_spec("vlm").model_cls(ARGS)
    before = dict(model.named_parameters())
    assert freeze(model, ["lm", "vision"], torch.bfloat16) == sum(p.numel() for p in model.projector.parameters())
    after = dict(model.named_parameters())
    assert all(after[n] is before[n] for n in before)  # the same Parameter objects, only their dtype changed
    model.to_empty(device="cpu")
    model.init_weights(seed=SEED, buffer_device=torch.device("cpu"))
    reference = _model()
    for name, p in model.named_parameters():
        ref = reference.get_parameter(name)
        frozen = not name.startswith("projector.")
        assert p.requires_grad != frozen and p.dtype == (torch.bfloat16 if frozen else torch.float32), name
        assert torch.equal(p, ref.to(p.dtype)), name  # fp32 init rounded to bf16, bitwise
    assert reference.lm.rope_cache.dtype == model.lm.rope_cache.dtype  # buffers are not parameters: untouched


def test_frozen_params_dtype_key():
    config = load_config(str(VLM_CONFIG), [])
    assert config.training.frozen_params_dtype == "param"
    assert frozen_params_dtype(config, "cpu") == torch.float32  # the compute dtype: float32 on CPU
    assert frozen_params_dtype(config, "cuda") == torch.bfloat16  # training.mixed_precision_param
    config = load_config(str(VLM_CONFIG), ["--training.frozen_params_dtype=bfloat16"])
    assert frozen_params_dtype(config, "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match="training.frozen_params_dtype = 'bf16'"):  # at load
        load_config(str(VLM_CONFIG), ["--training.frozen_params_dtype=bf16"])


def test_dcp_casts_between_float32_and_bfloat16(tmp_path):
    """A float32 checkpoint loads into bfloat16 frozen weights (rounded), and a checkpoint with bfloat16 frozen
    weights into a model training them in float32 (stage 1 -> stage 2): the values are the bfloat16 ones."""
    fp32, mixed = _model(seed=1), _model(torch.bfloat16, seed=2)
    dcp.save({"model": fp32.state_dict()}, checkpoint_id=str(tmp_path / "fp32"))
    dcp.save({"model": mixed.state_dict()}, checkpoint_id=str(tmp_path / "mixed"))
    metadata = dcp.FileSystemReader(str(tmp_path / "mixed")).read_metadata().state_dict_metadata
    assert metadata["model.lm.layers.0.attention.wq.weight"].properties.dtype == torch.bfloat16  # saved as stored
    assert metadata["model.projector.linear_1.weight"].properties.dtype == torch.float32

    into_mixed = _model(torch.bfloat16, seed=3)
    state = {"model": into_mixed.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "fp32"))
    into_mixed.load_state_dict(state["model"])
    into_fp32 = _model(torch.float32, parts=("vision",), seed=3)  # stage 2: the LM trains, in float32
    state = {"model": into_fp32.state_dict()}
    dcp.load(state, checkpoint_id=str(tmp_path / "mixed"))
    into_fp32.load_state_dict(state["model"])
    for name, p in into_mixed.named_parameters():
        assert p.dtype == mixed.get_parameter(name).dtype and torch.equal(p, fp32.get_parameter(name).to(p.dtype))
        q = into_fp32.get_parameter(name)
        assert q.dtype == torch.float32 and torch.equal(q, mixed.get_parameter(name).float()), name


def test_hf_load_into_bfloat16_frozen_params(tmp_path):
    """load_hf_into_model (checkpoint.initial_load_hf) casts each HF tensor to its parameter's dtype."""
    lm_cls, args = get_model_spec("llama").model_cls, ARGS.lm
    source = lm_cls(args)
    source.init_weights(seed=1)
    save_file(hf_mapping.titanmm_to_hf_state_dict(source.state_dict(), args), tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(hf_mapping.hf_config_from_args(args)))
    with torch.device("meta"):
        model = lm_cls(args)
    for p in model.layers.parameters():  # frozen blocks in bfloat16, embeddings and output in float32
        p.requires_grad_(False)
        p.data = p.data.to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.init_weights(seed=2, buffer_device=torch.device("cpu"))
    load_hf_into_model(model, tmp_path, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
    for name, p in model.named_parameters():
        assert torch.equal(p, source.get_parameter(name).to(p.dtype)), name


# ------------------------------------------------------------------------------------------------ launches


def _launch(nproc: int, out: Path, jobs: list[list[str]], fsdp_checks: bool = False) -> None:
    (out / "jobs.json").write_text(json.dumps({"jobs": jobs, "fsdp_checks": fsdp_checks}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           str(out / "jobs.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-8000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage-1 trainings of 3 steps: frozen float32 and bfloat16 on 1 process; bfloat16 on 2 processes (FSDP2,
    then TP), then stage 2 from the FSDP2 checkpoint (LM unfrozen, trained in float32) for one step."""
    out = tmp_path_factory.mktemp("frozen_dtype")
    f = {name: out / name for name in ("fp32", "bf16", "bf16_fsdp2", "bf16_tp2", "stage2")}
    _launch(1, out, [COMMON + STAGE1 + [f"--job.dump_folder={f['fp32']}", "--training.frozen_params_dtype=float32"],
                     COMMON + STAGE1 + CKPT + [f"--job.dump_folder={f['bf16']}",
                                               "--training.frozen_params_dtype=bfloat16"]])
    _launch(2, out, [COMMON + STAGE1 + CKPT + [f"--job.dump_folder={f['bf16_fsdp2']}",
                                               "--training.frozen_params_dtype=bfloat16"],
                     COMMON + STAGE1 + CKPT + [f"--job.dump_folder={f['bf16_tp2']}",
                                               "--training.frozen_params_dtype=bfloat16",
                                               "--parallelism.tensor_parallel_degree=2"],
                     COMMON + CKPT + [f"--job.dump_folder={f['stage2']}", "--model.freeze=vision",
                                      "--training.frozen_params_dtype=bfloat16", "--training.steps=1",
                                      "--training.local_batch_size=2",
                                      f"--checkpoint.initial_load_path={f['bf16_fsdp2'] / 'checkpoint'}"]],
            fsdp_checks=True)
    return f


@pytest.mark.slow
def test_bfloat16_frozen_training_matches_float32_and_layouts(runs):
    fp32, bf16 = logged(runs["fp32"]), logged(runs["bf16"])
    for step in (1, 2, 3):
        assert abs(bf16[step] - fp32[step]) <= 1e-3 * fp32[step], (step, bf16[step], fp32[step])
        for layout in ("bf16_fsdp2", "bf16_tp2"):
            loss = logged(runs[layout])[step]
            assert abs(loss - bf16[step]) <= 1e-5 * bf16[step], (layout, step, loss, bf16[step])
    assert bf16 != fp32  # the frozen weights really were rounded

    # The checkpoint holds the frozen weights in bfloat16, exactly the initial ones (also the LM norms that
    # tensor parallelism re-creates); the projector trained.
    initial = _model()
    for run in ("bf16", "bf16_fsdp2", "bf16_tp2"):
        directory = runs[run] / "checkpoint" / "step-3"
        metadata = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
        trained = titanmm.load(directory)
        for name, p in initial.named_parameters():
            frozen = not name.startswith("projector.")
            assert metadata[f"model.{name}"].properties.dtype == (torch.bfloat16 if frozen else torch.float32)
            assert torch.equal(trained.get_parameter(name), p.bfloat16().float()) == frozen, (run, name)


@pytest.mark.slow
def test_stage_two_trains_the_bfloat16_checkpoint_in_float32(runs):
    """Stage 2's first loss is the stage-1 model's (its bfloat16 LM loaded into float32 parameters)."""
    stage1 = titanmm.load(runs["bf16_fsdp2"] / "checkpoint" / "step-3")
    with torch.no_grad():
        expected = _loss(stage1, _batch()).item()
    assert abs(logged(runs["stage2"])[1] - expected) <= 1e-5 * expected
    metadata = dcp.FileSystemReader(str(runs["stage2"] / "checkpoint" / "step-1")).read_metadata().state_dict_metadata
    assert metadata["model.lm.layers.0.attention.wq.weight"].properties.dtype == torch.float32
    assert metadata["model.vision.blocks.0.attn.wq.weight"].properties.dtype == torch.bfloat16


@pytest.mark.slow
def test_fsdp2_units_mixing_frozen_bfloat16_and_trainable_float32(runs):
    """Checks made inside the 2-process launch (see `_fsdp_checks`), passed back as a JSON file."""
    results = json.loads((runs["bf16_fsdp2"].parent / "fsdp_checks.json").read_text())
    assert results["all_gather_exact"], results
    assert results["loss_bf16"] == results["loss_fp32"], results  # bitwise: FSDP2 rounds fp32 frozen weights alike
    assert results["grads_equal"] and results["grad_norm"] > 0, results


@pytest.mark.slow
def test_hf_export_of_a_mixed_dtype_checkpoint(runs, tmp_path):
    """--dtype keep exports each tensor as stored (bfloat16 LM, float32 projector); bf16 casts all."""
    from converters import export_hf

    directory = runs["bf16"] / "checkpoint" / "step-3"
    for dtype, projector in (("keep", "F32"), ("bf16", "BF16")):
        export_hf.main(["--checkpoint", str(directory), "--output", str(tmp_path / dtype), "--dtype", dtype,
                        "--no-progress"])
        with safe_open(str(tmp_path / dtype / "model.safetensors"), framework="pt") as f:
            dtypes = {n: f.get_slice(n).get_dtype() for n in f.keys()}
        assert dtypes.pop("multi_modal_projector.linear_1.weight") == projector
        assert dtypes.pop("multi_modal_projector.linear_2.bias") == projector
        assert {d for n, d in dtypes.items() if not n.startswith("multi_modal_projector.")} == {"BF16"}


# ------------------------------------------------------------------------------------------------ worker


def _fsdp_checks(out: Path) -> None:
    """FSDP2 (2 gloo ranks) over debug_vlm with lm + vision frozen: the root unit holds frozen token embedding,
    output layer and patch embedding next to the trainable projector.

    1. Without mixed precision the root's all-gather inputs mix bfloat16 and float32 (FSDP2 gathers them as
       bytes): every unsharded parameter equals the full one.
    2. With GPU-style mixed precision (bfloat16 compute, float32 reduction), frozen weights stored in bfloat16
       give bitwise the loss and projector gradients (reduce-scattered) of frozen weights kept in float32."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    from titanmm.parallel.fsdp import apply_fsdp
    from titanmm.parallel.parallelize_vlm import block_containers

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    results = {}

    def sharded(frozen_dtype, mp: str | None):
        with torch.device("meta"):
            model = get_model_spec("vlm").model_cls(ARGS)
        freeze(model, ["lm", "vision"], frozen_dtype)
        if mp is None:
            fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy())
        else:
            apply_fsdp(model, block_containers(model), mesh, mp, "float32")
        model.to_empty(device="cpu")
        model.init_weights(seed=SEED, buffer_device=torch.device("cpu"))
        return model

    full = _model(torch.bfloat16)
    model = sharded(torch.bfloat16, None)
    model.unshard()
    results["all_gather_exact"] = all(
        not isinstance(p, DTensor) and p.dtype == full.get_parameter(n).dtype and torch.equal(p, full.get_parameter(n))
        for n, p in model.named_parameters())
    model.reshard()

    batch = _batch()
    rank = dist.get_rank()
    local = {k: v[rank * 2:(rank + 1) * 2] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    grads = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model = sharded(dtype, "bfloat16")
        loss = _loss(model, local)
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("projector."))
        grads[name] = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        loss = loss.detach()
        dist.all_reduce(loss)
        results[f"loss_{name}"] = loss.item() / dist.get_world_size()
    results["grads_equal"] = grads["bf16"].keys() == grads["fp32"].keys() and all(
        torch.equal(grads["bf16"][n], grads["fp32"][n]) for n in grads["bf16"])
    results["grad_norm"] = sum(g.float().square().sum().item() for g in grads["bf16"].values()) ** 0.5
    if rank == 0:
        (out / "fsdp_checks.json").write_text(json.dumps(results))


def _worker(path: str) -> None:
    import torch.distributed as dist

    from titanmm.train import Trainer

    spec = json.loads(Path(path).read_text())
    for overrides in spec["jobs"]:
        Trainer(load_config(str(VLM_CONFIG), overrides, world_size=int(os.environ["WORLD_SIZE"]))).train()
        dist.barrier()  # the next job may load what this one saved
    if spec["fsdp_checks"]:
        _fsdp_checks(Path(path).parent)
    gc.collect()  # the trainers' FSDP2 cycles hold process groups: free them now, not at interpreter shutdown
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1])
