"""Pixel shuffle, projector presets and the VisionLanguageModel's forward."""

from __future__ import annotations

import json

import pytest
import torch

from titanmm.models import MODEL_SPECS
from titanmm.models.vlm import Projector, VisionLanguageModel, VLMArgs, pixel_shuffle
from titanmm.models.vlm.flavors import PROJECTOR_PRESETS, VLM_FLAVORS
from titanmm.parallel.context_parallel import image_feature_index


def _brute_force_shuffle(x_bnc, h, w, version):
    """internvit.md section 5: token (i, j) = [X[2i,2j], X[2i,2j+1], X[2i+1,2j], X[2i+1,2j+1]];
    v2 enumerates the blocks row-major (t = i*(w/2) + j), v1 column-major (t = j*(h/2) + i)."""
    b, _, c = x_bnc.shape
    grid = x_bnc.view(b, h, w, c)
    blocks = {}
    for i in range(h // 2):
        for j in range(w // 2):
            blocks[i, j] = torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j],
                                      grid[:, 2 * i + 1, 2 * j + 1]], dim=-1)
    if version == 2:
        order = [(i, j) for i in range(h // 2) for j in range(w // 2)]
    else:
        order = [(i, j) for j in range(w // 2) for i in range(h // 2)]
    return torch.stack([blocks[k] for k in order], dim=1)


def test_pixel_shuffle_spec_example():
    x = torch.arange(16.0).view(1, 16, 1)
    assert pixel_shuffle(x, (4, 4)).squeeze(0).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13],
                                                             [10, 11, 14, 15]]
    assert pixel_shuffle(x, (4, 4), version=1).squeeze(0).tolist() == [[0, 1, 4, 5], [8, 9, 12, 13], [2, 3, 6, 7],
                                                                        [10, 11, 14, 15]]


@pytest.mark.parametrize("h,w", [(4, 4), (6, 6), (4, 8), (8, 2)])
@pytest.mark.parametrize("version", [1, 2])
def test_pixel_shuffle_matches_brute_force(h, w, version):
    x = torch.randn(3, h * w, 5)
    got = pixel_shuffle(x, (h, w), 0.5, version)
    assert got.shape == (3, h * w // 4, 20)
    if version == 1 and h != w:
        return  # v1 is only defined by the reference code for square grids
    torch.testing.assert_close(got, _brute_force_shuffle(x, h, w, version), rtol=0, atol=0)


def test_pixel_shuffle_rejects_bad_grids():
    with pytest.raises(ValueError):
        pixel_shuffle(torch.randn(1, 15, 2), (3, 5))
    with pytest.raises(ValueError):
        pixel_shuffle(torch.randn(1, 16, 2), (4, 4), downsample=0.3)


@pytest.mark.parametrize("name,shapes", [
    ("llava_mlp2x_gelu", {"linear_1.weight": (4096, 1024), "linear_1.bias": (4096,), "linear_2.weight": (4096, 4096),
                          "linear_2.bias": (4096,)}),
    ("megatron_llava_mistral_7b", {"linear_1.weight": (14336, 1024), "linear_2.weight": (4096, 14336)}),
    ("nvlm_d_34b", {"norm.weight": (12800,), "norm.bias": (12800,), "linear_1.weight": (20480, 12800),
                    "linear_2.weight": (7168, 20480)}),
    ("nvlm_d_72b", {"norm.weight": (12800,), "norm.bias": (12800,), "linear_1.weight": (29568, 12800),
                    "linear_2.weight": (8192, 29568)}),
    ("nemotron_nano_vl_8b", {"norm.weight": (5120,), "norm.bias": (5120,), "linear_1.weight": (4096, 5120),
                             "linear_1.bias": (4096,), "linear_2.weight": (4096, 4096), "linear_2.bias": (4096,)}),
])
def test_projector_preset_shapes(name, shapes):
    with torch.device("meta"):
        projector = Projector(PROJECTOR_PRESETS[name])
    assert {k: tuple(v.shape) for k, v in projector.state_dict().items()} == shapes


def test_projector_math():
    args = PROJECTOR_PRESETS["nemotron_nano_vl_8b"]
    small = type(args)(vision_dim=4, hidden_dim=6, output_dim=5, layer_norm=True, pixel_shuffle=True, bias=True)
    projector = Projector(small)
    projector.init_weights(0)
    x = torch.randn(2, 16, 4)
    shuffled = pixel_shuffle(x, (4, 4))
    ref = torch.nn.functional.layer_norm(shuffled, (16,), projector.norm.weight, projector.norm.bias, 1e-5)
    ref = projector.linear_2(torch.nn.functional.gelu(projector.linear_1(ref)))
    torch.testing.assert_close(projector(x, (4, 4)), ref)


def test_full_size_flavors_build_on_meta():
    for name in ("llava_mistral_7b_clip336", "llava_v1.6_mistral_7b_clip336", "nvlm_d_34b", "nvlm_d_72b",
                 "nemotron_nano_vl_8b"):
        if name not in VLM_FLAVORS:
            continue
        args = VLMArgs.from_dict(json.loads(json.dumps(VLM_FLAVORS[name].to_dict())))
        with torch.device("meta"):
            model = VisionLanguageModel(args)
        assert model.projector.linear_2.weight.shape[0] == args.lm.dim
    nvlm = VLM_FLAVORS.get("nvlm_d_72b")
    if nvlm is not None:
        with torch.device("meta"):
            model = VisionLanguageModel(nvlm)
        assert model.tokens_per_tile(448, 448) == 256 and nvlm.image.max_tiles == 6 and nvlm.image.use_thumbnail


DEBUG_FLAVORS = [f for f in ("debug_vlm", "debug_vlm_siglip", "debug_vlm_internvit", "debug_vlm_radio")
                 if f in VLM_FLAVORS]


def _model(flavor):
    model = VisionLanguageModel(VLM_FLAVORS[flavor])
    model.init_weights(seed=0)
    return model


def _ids_for(model, counts, seq=None):
    size = model.args.image.tile_size
    n = model.tokens_per_tile(size, size)
    seq = seq or (max(counts) + 1) * (n + 2) + 4
    ids = torch.randint(3, 1000, (len(counts), seq), generator=torch.Generator().manual_seed(0))
    for b, count in enumerate(counts):
        for k in range(count):
            ids[b, 1 + k * (n + 2):1 + k * (n + 2) + n] = model.args.image_token_id
    pixels = torch.randn(sum(counts), 3, size, size, generator=torch.Generator().manual_seed(1))
    return ids, pixels, n


@pytest.mark.parametrize("flavor", DEBUG_FLAVORS)
def test_forward_with_zero_one_and_several_images(flavor):
    model = _model(flavor)
    ids, pixels, n = _ids_for(model, [0, 1, 3])
    with torch.no_grad():
        logits = model(ids, pixels)
        assert logits.shape == (*ids.shape, model.args.lm.vocab_size)
        # Each sample equals running it alone with its own tiles.
        starts = [0, 0, 1, 4]
        for b in range(3):
            own = pixels[starts[b]:starts[b + 1]] if starts[b + 1] > starts[b] else None
            torch.testing.assert_close(model(ids[b:b + 1], own), logits[b:b + 1], rtol=1e-5, atol=1e-5)
        # Text-only samples: None and an empty tile batch give the plain LM's logits.
        text = ids[:1]
        plain = model.lm(text)
        torch.testing.assert_close(model(text), plain)
        torch.testing.assert_close(model(text, pixels[:0]), plain)


def test_images_change_only_later_positions():
    model = _model("debug_vlm")
    ids, pixels, n = _ids_for(model, [1])
    with torch.no_grad():
        a = model(ids, pixels)
        b = model(ids, pixels + 1.0)
    assert torch.equal(a[:, 0], b[:, 0])  # before the image (causal)
    assert not torch.allclose(a[:, 1 + n:], b[:, 1 + n:])


def test_placeholder_count_mismatch_is_an_error():
    model = _model("debug_vlm")
    ids, pixels, n = _ids_for(model, [2])
    with pytest.raises(ValueError, match="image placeholder tokens"):
        model(ids, pixels[:1])
    with pytest.raises(ValueError, match="image placeholder tokens"):
        model(ids)
    ids[0, 1] = 5
    with pytest.raises(ValueError, match="image placeholder tokens"):
        model(ids, pixels)


def test_merge_places_embeddings_in_order_with_masked_scatter_gradients():
    """The index_copy merge (no host read of the placeholder count, forward or backward) equals masked_scatter,
    values and gradients; the indexed merge (context parallelism) equals it on the whole sequence."""
    model = _model("debug_vlm")
    ids = torch.tensor([[1, 9, 9, 4, 9], [9, 3, 9, 9, 2]])
    ids = torch.where(ids == 9, torch.full_like(ids, model.args.image_token_id), ids)
    is_image = ids == model.args.image_token_id
    h = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    images = torch.randn(int(is_image.sum()), 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 5, 8, dtype=torch.float64)
    grads = []
    for merge in (lambda: model.merge_image_embeddings(ids, h, images),
                  lambda: h.masked_scatter(is_image.unsqueeze(-1), images),
                  lambda: model.merge_indexed_image_embeddings(ids, h, images, image_feature_index(
                      ids, model.args.image_token_id))):
        out = merge()
        grads.append((out.detach(), *torch.autograd.grad((out * weights).sum(), (h, images))))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="past the 4 the images give"):
        model.merge_indexed_image_embeddings(ids, h, images[:4], image_feature_index(ids, model.args.image_token_id))


def test_args_round_trip_and_registry():
    args = VLM_FLAVORS["debug_vlm"]
    again = VLMArgs.from_dict(json.loads(json.dumps(args.to_dict())))
    assert again == args
    assert MODEL_SPECS["vlm"].model_cls is VisionLanguageModel
    with pytest.raises(ValueError, match="image_token_id"):
        VLMArgs.from_dict({**args.to_dict(), "image_token_id": 5000})


def test_init_is_deterministic_and_gradients_reach_all_parts():
    a, b = _model("debug_vlm"), _model("debug_vlm")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    ids, pixels, _ = _ids_for(a, [1, 1])
    a(ids, pixels).logsumexp(-1).mean().backward()
    for part in (a.vision.patch_embed, a.vision.blocks["0"].attn.wq, a.projector.linear_1, a.lm.tok_embeddings):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0
