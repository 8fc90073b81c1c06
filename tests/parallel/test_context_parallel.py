"""Context parallelism on CPU: config checks and the VLM's image merge on a sequence shard.
(Ring attention itself needs GPUs: tests/gpu/test_gpu_context_parallel.py.)"""

import pytest
import torch

from titanmm.config import load_config
from titanmm.config.loader import ConfigError
from titanmm.models import get_model_spec
from titanmm.parallel.context_parallel import image_feature_index
from tests.utils import REPO

DEBUG = str(REPO / "train_configs" / "debug_llama.toml")


@pytest.mark.parametrize("overrides, message", [
    (["--parallelism.context_parallel_degree=2"], "needs training.document_masking = false"),
    (["--parallelism.context_parallel_degree=2", "--training.document_masking=false", "--training.seq_len=130"],
     "training.seq_len = 130 must be divisible by 2 \\* parallelism.context_parallel_degree"),
    (["--parallelism.context_parallel_degree=2", "--training.document_masking=false",
      "--parallelism.context_parallel_rotate_method=ring"], "context_parallel_rotate_method = 'ring'"),
    (["--parallelism.context_parallel_degree=2", "--training.document_masking=false",
      "--parallelism.data_parallel_replicate_degree=2"], "HSDP with context parallelism"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEBUG, overrides)


def test_context_parallel_config_accepted():
    config = load_config(DEBUG, ["--parallelism.context_parallel_degree=2", "--training.document_masking=false"],
                         world_size=4)
    assert config.parallelism.context_parallel_degree == 2


def test_image_feature_index_merges_a_shard_like_the_whole_sequence():
    """Load-balanced CP shard (chunks r and 2cp-1-r): each image token takes the embedding it takes in the
    whole sequence."""
    torch.manual_seed(0)
    spec = get_model_spec("vlm")
    args = spec.flavors["debug_vlm"]
    model = spec.model_cls(args)
    model.init_weights(seed=0)
    image = args.image.tile_size
    per_tile = model.tokens_per_tile(image, image)
    seq, cp = 4 * per_tile, 2
    input_ids = torch.randint(3, 1000, (2, seq))
    input_ids[0, 5:5 + per_tile] = args.image_token_id           # sample 0: one image
    input_ids[1, 2:2 + 2 * per_tile] = args.image_token_id       # sample 1: two images
    pixel_values = torch.randn(3, 3, image, image)
    captured = {}
    model.lm.forward_embeddings = lambda h, *a, **k: captured.setdefault("h", h)

    whole = model(input_ids, pixel_values).detach()
    index = image_feature_index(input_ids, args.image_token_id)
    chunks = torch.arange(seq).chunk(2 * cp)
    for rank in range(cp):
        positions = torch.cat([chunks[rank], chunks[2 * cp - 1 - rank]])
        captured.clear()
        shard = model(input_ids[:, positions], pixel_values, image_feature_index=index[:, positions]).detach()
        torch.testing.assert_close(shard, whole[:, positions], rtol=0, atol=0)
