"""`model.n_layers` overrides the depth of a flavor for language models and for a VLM's language model."""

from titanmm.config import load_config
from titanmm.train import model_args_for
from tests.utils import REPO


def test_n_layers_override_for_llama_and_vlm():
    config = load_config(str(REPO / "train_configs" / "debug_llama.toml"), ["--model.n_layers=1"])
    _, args = model_args_for(config)
    assert args.n_layers == 1
    config = load_config(str(REPO / "train_configs" / "debug_vlm.toml"), ["--model.n_layers=1"])
    _, args = model_args_for(config)
    assert args.lm.n_layers == 1 and args.vision is not None
