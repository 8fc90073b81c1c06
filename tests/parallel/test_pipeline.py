"""Pipeline parallelism: stage layouts, config checks, and training runs whose losses equal the
single-process run (float32, CPU, gloo).

Starting processes (importing torch) costs more than these tiny runs, so runs are grouped: one
2-rank launch trains with every schedule and the VLM, one 8-rank launch trains at PP 2 x TP 2 x DP 2
(saving a checkpoint) and resumes a single-process checkpoint there; single-process runs happen
inside the test process.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.utils import REPO, logged, run_env
from titanmm.config import load_config
from titanmm.config.loader import ConfigError
from titanmm.models import get_model_spec
from titanmm.data.vlm_data import tiles_by_sample
from titanmm.parallel.pipeline import SCHEDULES, stage_ids, stage_layers, stage_module
from titanmm.train import Trainer, cross_entropy_sum

LLAMA = str(REPO / "train_configs" / "debug_llama.toml")
VLM = str(REPO / "train_configs" / "debug_vlm.toml")
QUIET = ["--metrics.log_freq=1", "--metrics.enable_tensorboard=false", "--metrics.plot_loss=false"]
# 4 steps of 8 samples: 2 micro-batches of 4 per step on one rank, each 4 pipeline microbatches of 1.
LLAMA_RUN = ["--training.steps=4", "--training.seq_len=64", "--training.global_batch_size=8",
             "--training.local_batch_size=4", "--lr_scheduler.warmup_steps=2", *QUIET]
VLM_RUN = ["--training.steps=3", "--training.seq_len=128", "--training.global_batch_size=4",
           "--training.local_batch_size=2", "--lr_scheduler.warmup_steps=2", *QUIET]
SAVE_AT_2 = ["--checkpoint.enable=true", "--checkpoint.interval=2"]
PP2 = ["--parallelism.pipeline_parallel_degree=2"]
PP2_TP2 = PP2 + ["--parallelism.tensor_parallel_degree=2"]
# Before torch 2.13 the V schedule's set-up sends from a rank to itself, which gloo cannot do.
V_ON_GLOO = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 13)
SCHEDULES_HERE = [s for s in SCHEDULES if V_ON_GLOO or s != "ZBVZeroBubble"]
VLM_SCHEDULES = ["1F1B"] + (["ZBVZeroBubble"] if V_ON_GLOO else [])  # ZBV: the vision tower and the loss on rank 0


def _parallelism(**keys):
    p = load_config(LLAMA).parallelism
    for key, value in keys.items():
        setattr(p, f"pipeline_parallel_{key}", value)
    return p


# ----------------------------------------------------------------------------------------------
# Stage layouts
# ----------------------------------------------------------------------------------------------


def test_stage_layers():
    assert stage_layers(_parallelism(degree=2), 4) == [range(0, 2), range(2, 4)]
    assert stage_layers(_parallelism(degree=2, schedule="Interleaved1F1B"), 4) == [range(i, i + 1) for i in range(4)]
    # 30 blocks + 1 + 1 = 32 layers, 8 per stage; the first and last stage hold one block fewer.
    layers = stage_layers(_parallelism(degree=4, first_stage_less_layers=1, last_stage_less_layers=1), 30)
    assert [len(r) for r in layers] == [7, 8, 8, 7] and layers[-1] == range(23, 30)
    # 4 stages per rank of 2 blocks.
    layers = stage_layers(_parallelism(degree=2, schedule="LoopedBFS", layers_per_stage=2), 16)
    assert [len(r) for r in layers] == [2] * 8
    # The first stage may hold only the embedding.
    layers = stage_layers(_parallelism(degree=2, schedule="ZBVZeroBubble", first_stage_less_layers=1), 3)
    assert [len(r) for r in layers] == [0, 1, 1, 1]


@pytest.mark.parametrize("keys, message", [
    (dict(degree=2, layers_per_stage=3), "pipeline_parallel_layers_per_stage = 3 does not divide"),
    (dict(degree=2, layers_per_stage=1), "'1F1B' runs one stage per rank"),
    (dict(degree=2, schedule="Interleaved1F1B", layers_per_stage=2), "runs two or more stages per rank"),
    (dict(degree=2, schedule="ZBVZeroBubble", layers_per_stage=2), "'ZBVZeroBubble' runs two stages per rank"),
    (dict(degree=2, first_stage_less_layers=1), "do not split evenly into 2 pipeline stages"),
    (dict(degree=2, first_stage_less_layers=6), "exceed the 5 layers per stage"),
])
def test_stage_layer_errors(keys, message):
    with pytest.raises(ValueError, match=message):
        stage_layers(_parallelism(**keys), 4)


def test_stage_ids():
    assert [stage_ids(r, 2, 4, "Interleaved1F1B") for r in range(2)] == [[0, 2], [1, 3]]
    assert [stage_ids(r, 4, 8, "ZBVZeroBubble") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [stage_ids(r, 2, 2, "1F1B") for r in range(2)] == [[0], [1]]


@pytest.mark.parametrize("name, flavor", [("llama", "debug"), ("vlm", "debug_vlm")])
def test_stages_keep_the_names_of_the_whole_model(name, flavor):
    spec = get_model_spec(name)
    with torch.device("meta"):
        model = spec.model_cls(spec.flavors[flavor])
    layers = stage_layers(_parallelism(degree=2, schedule="Interleaved1F1B"), 4)
    stages = [stage_module(model, r, first=i == 0, last=i == 3) for i, r in enumerate(layers)]
    names = [set(stage.state_dict()) for stage in stages]
    assert set().union(*names) == set(model.state_dict()) and sum(map(len, names)) == len(model.state_dict())
    prefix = "lm." if name == "vlm" else ""
    assert f"{prefix}tok_embeddings.weight" in names[0] and f"{prefix}output.weight" in names[3]
    assert f"{prefix}layers.2.attention.wq.weight" in names[2]
    if name == "vlm":
        assert any(n.startswith(("vision.", "projector.")) for n in names[0])
        assert not any(n.startswith(("vision.", "projector.")) for n in set().union(*names[1:]))


def test_vlm_takes_tiles_by_sample_and_hidden_states():
    """The VLM takes tiles by sample (padded, with a mask: how the pipeline gets them) exactly like all
    tiles of the batch at once; without the embedding (a later stage) it takes hidden states."""
    spec = get_model_spec("vlm")
    args = spec.flavors["debug_vlm"]
    torch.manual_seed(0)
    model = spec.model_cls(args)
    model.init_weights(seed=0)
    per_tile = model.tokens_per_tile(args.image.tile_size, args.image.tile_size)
    input_ids = torch.randint(0, args.image_token_id, (3, 4 * per_tile))
    input_ids[0, :3 * per_tile] = args.image_token_id
    input_ids[2, 5:5 + per_tile] = args.image_token_id
    pixel_values = torch.randn(4, 3, args.image.tile_size, args.image.tile_size)
    by_sample, mask = tiles_by_sample(pixel_values, torch.tensor([3, 0, 1]))
    assert by_sample.shape[:2] == (3, 3) and mask.sum(1).tolist() == [3, 0, 1]
    with torch.no_grad():
        expected = model(input_ids, pixel_values)
        torch.testing.assert_close(model(input_ids, by_sample, tile_mask=mask), expected, rtol=0, atol=0)
        # A stage without the embedding takes hidden states; here the whole LM, from the embeddings on.
        hidden = model.lm.tok_embeddings(input_ids)
        later = stage_module(model, range(0, 4), first=False, last=True)
        torch.testing.assert_close(later(hidden), model.lm(input_ids), rtol=0, atol=0)


def test_pipeline_loss_carries_loss_weights_with_the_labels():
    """The schedule splits one target: with per-token loss weights the trainer stacks them with the labels."""
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    weights = torch.rand(2, 5)
    trainer = type("T", (), {"pp_loss_scale": torch.tensor(0.25), "loss_fn": staticmethod(cross_entropy_sum)})()
    packed = torch.stack([labels.float(), weights], dim=-1)
    torch.testing.assert_close(Trainer._pipeline_loss(trainer, logits, packed),
                               cross_entropy_sum(logits, labels, weights) * 0.25)
    torch.testing.assert_close(Trainer._pipeline_loss(trainer, logits, labels), cross_entropy_sum(logits, labels) * 0.25)


# ----------------------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["--parallelism.pipeline_parallel_schedule=Bogus"], "parallelism.pipeline_parallel_schedule = 'Bogus'"),
    (PP2 + ["--parallelism.pipeline_parallel_microbatch_size=3"],
     "training.local_batch_size = 8 is not a multiple of parallelism.pipeline_parallel_microbatch_size = 3"),
    (PP2 + ["--parallelism.pipeline_parallel_microbatch_size=8"], "1 microbatches cannot fill"),
    (PP2 + ["--parallelism.pipeline_parallel_schedule=Interleaved1F1B", "--training.local_batch_size=5"],
     "must be a multiple of 2 rounds"),
    (PP2 + ["--parallelism.pipeline_parallel_schedule=ZBVZeroBubble", "--compile.enable=true"],
     "splits backward into input and weight gradients"),
    (PP2 + ["--parallelism.pipeline_parallel_layers_per_stage=3"], "pipeline_parallel_layers_per_stage = 3"),
    (PP2 + ["--parallelism.pipeline_parallel_first_stage_less_layers=-1"],
     "parallelism.pipeline_parallel_first_stage_less_layers = -1 must be >= 0"),
    (PP2 + ["--model.flavor=debug_qwen2"], "ties the output layer to the token embedding"),
    (PP2 + ["--parallelism.tensor_parallel_degree=2", "--model.name=vlm", "--model.flavor=debug_vlm",
            "--training.dataset=mock", "--parallelism.pipeline_parallel_first_stage_less_layers=4"],
     "needs a language-model block on the first pipeline stage"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(LLAMA, ["--training.global_batch_size=-1", *overrides])


def test_config_pipeline_degree_against_world_size():
    with pytest.raises(ConfigError, match="pipeline_parallel_degree=2\\) but the world size is 6"):
        load_config(LLAMA, PP2 + ["--parallelism.data_parallel_shard_degree=2"], world_size=6)
    config = load_config(LLAMA, PP2_TP2, world_size=8)
    assert config.parallelism.pipeline_parallel_degree == 2


# ----------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------


def _train_here(config_path: str, overrides: list[str]) -> None:
    """A single-process run inside the test process (one-rank gloo group, one thread like the launched ranks)."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved, threads = {k: os.environ.pop(k) for k in keys if k in os.environ}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(config_path, overrides, world_size=1)).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k in keys:
            os.environ.pop(k, None)
        os.environ.update(saved)
        torch.set_num_threads(threads)


def _launch(nproc: int, jobs: list[tuple[str, list[str]]], folder) -> None:
    """Run `jobs` ([(config, overrides)]) one after another in one torchrun launch of `nproc` ranks."""
    path = folder / "jobs.json"
    path.write_text(json.dumps([{"config": c, "overrides": o} for c, o in jobs]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "tests" / "parallel" / "run_jobs.py"), str(path)]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"launch failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")


def _copy_checkpoint(source, target, step: int = 2) -> None:
    """Make `target` a run folder whose checkpoint folder holds only `source`'s checkpoint of `step`."""
    (target / "checkpoint").mkdir(parents=True)
    shutil.copytree(source / "checkpoint" / f"step-{step}", target / "checkpoint" / f"step-{step}")


def _assert_losses_equal(folder, reference: dict[int, float], steps) -> None:
    losses = logged(folder)
    assert sorted(losses) == list(steps), (folder, sorted(losses))
    for step in steps:
        assert abs(losses[step] - reference[step]) <= 1e-5 * abs(reference[step]), (folder.name, step, losses,
                                                                                      reference)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def reference(runs):
    """Single-process runs: the Llama (saving step 2) and the VLM."""
    _train_here(LLAMA, LLAMA_RUN + SAVE_AT_2 + [f"--job.dump_folder={runs / 'single'}"])
    _train_here(VLM, VLM_RUN + [f"--job.dump_folder={runs / 'vlm_single'}"])
    llama, vlm = logged(runs / "single"), logged(runs / "vlm_single")
    assert llama[4] < llama[1]  # it trained
    return llama, vlm


@pytest.fixture(scope="module")
def two_ranks(runs):
    """PP 2 with every schedule (Interleaved1F1B saves step 2: two stages per rank), and the VLM."""
    jobs = []
    for schedule in SCHEDULES_HERE:
        save = SAVE_AT_2 if schedule == "Interleaved1F1B" else []
        jobs.append((LLAMA, LLAMA_RUN + PP2 + save + [f"--parallelism.pipeline_parallel_schedule={schedule}",
                                                      f"--job.dump_folder={runs / schedule}"]))
    for schedule in VLM_SCHEDULES:
        jobs.append((VLM, VLM_RUN + PP2 + [f"--parallelism.pipeline_parallel_schedule={schedule}",
                                           f"--job.dump_folder={runs / f'vlm_{schedule}'}"]))
    _launch(2, jobs, runs)


@pytest.fixture(scope="module")
def eight_ranks(runs, reference):
    """PP 2 x TP 2 x DP 2 from scratch (saving step 2), and resumed from the single-process step 2."""
    _copy_checkpoint(runs / "single", runs / "pp_tp_dp_resumed")
    _launch(8, [(LLAMA, LLAMA_RUN + PP2_TP2 + SAVE_AT_2 + [f"--job.dump_folder={runs / 'pp_tp_dp'}"]),
                (LLAMA, LLAMA_RUN + PP2_TP2 + SAVE_AT_2 + [f"--job.dump_folder={runs / 'pp_tp_dp_resumed'}"])], runs)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_schedule_matches_single_process(schedule, runs, reference, two_ranks):
    if schedule not in SCHEDULES_HERE:
        pytest.skip(f"{schedule} on gloo needs torch >= 2.13")
    _assert_losses_equal(runs / schedule, reference[0], range(1, 5))


@pytest.mark.slow
@pytest.mark.parametrize("schedule", VLM_SCHEDULES)
def test_vlm_matches_single_process(schedule, runs, reference, two_ranks):
    _assert_losses_equal(runs / f"vlm_{schedule}", reference[1], range(1, 4))


@pytest.mark.slow
def test_pp_tp_dp_matches_single_process(runs, reference, eight_ranks):
    _assert_losses_equal(runs / "pp_tp_dp", reference[0], range(1, 5))


@pytest.mark.slow
def test_single_process_checkpoint_resumes_on_pp_tp_dp(runs, reference, eight_ranks):
    _assert_losses_equal(runs / "pp_tp_dp_resumed", reference[0], range(3, 5))


@pytest.mark.slow
@pytest.mark.parametrize("source", ["Interleaved1F1B", "pp_tp_dp"])
def test_pipeline_checkpoint_resumes_on_one_rank(source, runs, reference, two_ranks, eight_ranks, tmp_path):
    """Checkpoints of PP 2 with two stages per rank, and of PP 2 x TP 2 x DP 2, continue on one rank."""
    _copy_checkpoint(runs / source, tmp_path)
    _train_here(LLAMA, LLAMA_RUN + SAVE_AT_2 + [f"--job.dump_folder={tmp_path}"])
    _assert_losses_equal(tmp_path, reference[0], range(3, 5))
