"""Every TOML in train_configs/ loads and validates; the [multimodal] / model.freeze / vlm dataset checks.

Recipe configs name a placeholder dataset path that users set; `training.dataset` is validated at load (it must
exist), so the test points vision-language configs at a stand-in energon metadataset .yaml.
"""

from __future__ import annotations

import tomllib

import pytest

from tests.utils import REPO
from titanmm.config import load_config
from titanmm.config.loader import ConfigError
from titanmm.models import get_model_spec

CONFIGS = sorted((REPO / "train_configs").glob("*.toml"))
RECIPES = ("llava_mistral_clip_pretrain", "llava_mistral_clip_sft", "nvlm_d_34b_pretrain", "nvlm_d_34b_sft",
           "nvlm_d_72b_pretrain", "nvlm_d_72b_sft", "nemotron_nano_vl_8b_pretrain", "nemotron_nano_vl_8b_sft")


@pytest.fixture
def blend(tmp_path):
    path = tmp_path / "blend.yaml"
    path.write_text("__module__: megatron.energon\n__class__: MetadatasetV2\nsplits:\n  train:\n    path: ./data\n")
    return path


def load(path, blend, *overrides):
    raw = tomllib.loads(path.read_text())
    dataset = raw.get("training", {}).get("dataset", "mock")
    if raw.get("model", {}).get("name") == "vlm" and dataset != "mock":
        overrides = (f"--training.dataset={blend}", *overrides)
    return load_config(str(path), list(overrides))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path, blend):
    config = load(path, blend)
    assert config.model.flavor in get_model_spec(config.model.name).flavors


def test_recipes_exist_with_their_stages(blend):
    configs = {name: load(REPO / "train_configs" / f"{name}.toml", blend) for name in RECIPES}
    for name, config in configs.items():
        stage_one = name.endswith("pretrain")
        assert config.model.name == "vlm" and config.checkpoint.enable
        assert ("lm" in config.model.freeze) == stage_one, name
        if not name.startswith("nemotron") or stage_one:
            assert "vision" in config.model.freeze, name
    assert configs["nemotron_nano_vl_8b_sft"].model.freeze == []
    assert configs["llava_mistral_clip_pretrain"].multimodal.task == "captioning"
    assert {c.multimodal.loss_scaling for n, c in configs.items() if n.startswith("nemotron")} == {"sqrt_length"}


def test_vlm_dataset_must_be_prepared_for_energon(tmp_path, blend):
    debug = REPO / "train_configs" / "debug_vlm.toml"
    with pytest.raises(ConfigError, match="training.dataset = .* does not exist"):
        load_config(str(debug), [f"--training.dataset={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="training.dataset = .* without .nv-meta"):
        load_config(str(debug), [f"--training.dataset={tmp_path}"])
    (tmp_path / "data.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="training.dataset = .*jsonl file"):
        load_config(str(debug), [f"--training.dataset={tmp_path / 'data.jsonl'}"])
    (tmp_path / ".nv-meta").mkdir()
    (tmp_path / ".nv-meta" / "dataset.yaml").write_text("sample_type: {}\n")
    assert load_config(str(debug), [f"--training.dataset={tmp_path}"]).training.dataset == str(tmp_path)
    assert load_config(str(debug), [f"--training.dataset={blend}"]).training.dataset == str(blend)


@pytest.mark.parametrize("overrides, message", [
    (["--model.freeze=lm,vision,projector"], "freezes every parameter"),
    (["--model.freeze=llm"], "model.freeze = 'llm'"),
    (["--multimodal.task=qa"], "multimodal.task"),
    (["--multimodal.loss_scaling=mean"], "multimodal.loss_scaling"),
    (["--multimodal.chat_template=vicuna"], "multimodal.chat_template"),
    (["--multimodal.num_workers=-1"], "multimodal.num_workers"),
    (["--multimodal.packing_buffer_size=0"], "multimodal.packing_buffer_size"),
    (["--multimodal.packing=true", "--training.document_masking=false"], "training.document_masking"),
])
def test_multimodal_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(str(REPO / "train_configs" / "debug_vlm.toml"), overrides)


def test_freeze_and_loss_scaling_are_vlm_only():
    for overrides, key in ((["--model.freeze=lm"], "model.freeze"),
                           (["--multimodal.loss_scaling=sqrt_length"], "multimodal.loss_scaling")):
        with pytest.raises(ConfigError, match=key):
            load_config(str(REPO / "train_configs" / "debug_llama.toml"), overrides)
