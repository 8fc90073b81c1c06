"""Online captioning evaluation in the trainer ([eval]): an eval_cider entry in metrics.jsonl, the same captions
and CIDEr on one process and on two FSDP ranks (gloo, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from eval.metrics import cider
from tests.eval.benchmark_inputs import image
from tests.utils import REPO, logged, run_env, train_command

VLM_CONFIG = REPO / "train_configs" / "debug_vlm.toml"


def _caption_set(folder):
    """A COCO captions JSON with 5 images next to it."""
    folder.mkdir()
    images, annotations = [], []
    for n in range(5):
        name = f"COCO_val2014_{n + 1:012d}.jpg"
        image(200 + n).save(folder / name)
        images.append({"id": n + 1, "file_name": name})
        annotations += [{"image_id": n + 1, "id": 2 * n, "caption": f"a photo of thing number {n}"},
                        {"image_id": n + 1, "id": 2 * n + 1, "caption": "some colours in a small picture"}]
    (folder / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return folder / "captions.json"


def _train(nproc, folder, dataset):
    overrides = ["--training.steps=1", "--training.seq_len=96", "--training.global_batch_size=4",
                 "--training.local_batch_size=2", "--lr_scheduler.warmup_steps=1", "--eval.enable=true",
                 "--eval.interval=1", f"--eval.dataset={dataset}", "--eval.num_samples=5", "--eval.max_new_tokens=8",
                 "--eval.batch_size=2"]
    cmd = train_command(nproc, folder, overrides, config=VLM_CONFIG)
    if nproc == 1:  # one plain process (the trainer makes its own one-rank process group)
        cmd = [sys.executable] + cmd[cmd.index("titanmm.train") - 1:]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return [json.loads(line) for line in (folder / "eval" / "step-1.jsonl").open()]


@pytest.mark.slow
def test_online_eval_single_and_fsdp(tmp_path):
    dataset = _caption_set(tmp_path / "captions")
    single = _train(1, tmp_path / "single", dataset)
    fsdp = _train(2, tmp_path / "fsdp", dataset)
    assert [r["image_id"] for r in single] == [1, 2, 3, 4, 5]
    assert fsdp == single  # the same captions from the sharded model, padding rank included
    value = logged(tmp_path / "single", "eval_cider")[1]
    assert logged(tmp_path / "fsdp", "eval_cider")[1] == value
    assert value == pytest.approx(cider({r["image_id"]: r["caption"] for r in single},
                                        {r["image_id"]: r["references"] for r in single}))


def test_eval_config_is_checked(tmp_path):
    from titanmm.config import load_config
    from titanmm.config.loader import ConfigError

    dataset = tmp_path / "captions.json"
    dataset.write_text("{}")
    base = ["--model.name=vlm", "--model.flavor=debug_vlm", "--eval.enable=true", f"--eval.dataset={dataset}"]
    assert load_config(str(VLM_CONFIG), base, world_size=1).eval.enable
    for overrides, message in ((["--model.name=llama", "--model.flavor=debug"], "model.name = 'vlm'"),
                               (["--parallelism.tensor_parallel_degree=2"], "data-parallel layouts"),
                               (["--eval.dataset=/nonexistent.json"], "is not a file"),
                               (["--eval.interval=0"], "eval.interval")):
        with pytest.raises(ConfigError, match=message):
            load_config(str(VLM_CONFIG), base + overrides, world_size=2)
