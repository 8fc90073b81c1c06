"""Published vision-language model shapes, projector presets, and tiny models for tests.

Projector presets (input width after any pixel shuffle -> hidden -> LM width):

* `llava_mlp2x_gelu`: LLaVA-1.5 / 1.6 `mlp2x_gelu` on CLIP-L (HF `LlavaMultiModalProjector`,
  `linear_1` [4096, 1024], `linear_2` [4096, 4096], with biases): 1024 -> 4096 -> 4096.
* `megatron_llava_mistral_7b`: Megatron-LM `examples/multimodal` (`get_vision_projection_config`,
  language_model_type "mistral_7b"): ffn_hidden_size 14336, no norm, no bias: 1024 -> 14336 -> 4096.
* `nvlm_d_34b`: InternViT-6B (3200) pixel-shuffled to 12800, LayerNorm, 12800 -> 20480 -> 7168, no bias
  (Megatron "yi-34b": LayerNorm, ffn_hidden_size 20480, add_bias_linear False).
* `nvlm_d_72b`: the same into Qwen2-72B: 12800 -> 29568 -> 8192, no bias (HF `mlp1.1/3` have no bias).
* `nemotron_nano_vl_8b`: C-RADIO-H (1280) pixel-shuffled to 5120, LayerNorm, 5120 -> 4096 -> 4096 with
  biases (Megatron "llama3.1_8b": LayerNorm eps 1e-5, ffn_hidden_size 4096, add_bias_linear True).

Image token ids of the flavors are the placeholder each model family uses where known
(LLaVA-1.6 `<image>` = 32000, Qwen2 `<|vision_pad|>` = 151654 (NVLM-D-72B), Llama 3
`<|reserved_special_token_0|>` = 128002); the Megatron-recipe Mistral and Yi flavors use a
reserved id that must match the tokenizer in use: override `image_token_id` to fit yours.
"""

from __future__ import annotations

import dataclasses

from titanmm.models.llama.flavors import LLAMA_FLAVORS
from titanmm.models.vlm.args import ImageArgs, ProjectorArgs, VLMArgs

PROJECTOR_PRESETS: dict[str, ProjectorArgs] = {
    "llava_mlp2x_gelu": ProjectorArgs(vision_dim=1024, hidden_dim=4096, output_dim=4096, bias=True),
    "megatron_llava_mistral_7b": ProjectorArgs(vision_dim=1024, hidden_dim=14336, output_dim=4096, bias=False),
    "nvlm_d_34b": ProjectorArgs(vision_dim=3200, hidden_dim=20480, output_dim=7168, bias=False, layer_norm=True,
                                pixel_shuffle=True),
    "nvlm_d_72b": ProjectorArgs(vision_dim=3200, hidden_dim=29568, output_dim=8192, bias=False, layer_norm=True,
                                pixel_shuffle=True),
    "nemotron_nano_vl_8b": ProjectorArgs(vision_dim=1280, hidden_dim=4096, output_dim=4096, bias=True,
                                         layer_norm=True, pixel_shuffle=True),
}

_LLAVA_IMAGE = ImageArgs(preset="clip_336", tile_size=336)
_NVLM_IMAGE = ImageArgs(preset="internvl_448", tile_size=448, tiling="internvl", max_tiles=6, use_thumbnail=True,
                        tile_tags="nvlm", image_start="<Image>", image_end="</Image>")
_NEMOTRON_IMAGE = ImageArgs(preset="radio", tile_size=512, tiling="area_weighted", max_tiles=12,
                            use_thumbnail=True, image_start="<img>", image_end="</img>")


def projector_preset(name: str, **changes) -> ProjectorArgs:
    """A copy of a projector preset, with some fields changed."""
    if name not in PROJECTOR_PRESETS:
        raise ValueError(f"unknown projector preset {name!r}; known: {sorted(PROJECTOR_PRESETS)}")
    return dataclasses.replace(PROJECTOR_PRESETS[name], **changes)


def _lm(name: str, **changes):
    return dataclasses.replace(LLAMA_FLAVORS[name], **changes)


def _vision(family: str, flavor: str, **changes):
    """A copy of a vision flavor, or None when that encoder is not available."""
    from titanmm.models import MODEL_SPECS

    if family not in MODEL_SPECS:
        return None
    return dataclasses.replace(MODEL_SPECS[family].flavors[flavor], **changes)


def _build() -> dict[str, VLMArgs]:
    flavors: dict[str, VLMArgs] = {}

    def add(name: str, vision_model: str, vision, projector: ProjectorArgs, lm, image_token_id: int,
            image: ImageArgs) -> None:
        if vision is not None:
            flavors[name] = VLMArgs(vision_model=vision_model, vision=vision, projector=projector, lm=lm,
                                    image_token_id=image_token_id, image=image)

    clip336 = _vision("clip", "clip_vit_l14_336", select_layer=-2, drop_class_token=True)
    # Megatron-LM's LLaVA recipe (examples/multimodal, mistral_7b + CLIP-L/336): 1024 -> 14336 -> 4096.
    add("llava_mistral_7b_clip336", "clip", clip336, projector_preset("megatron_llava_mistral_7b"),
        _lm("mistral_7b"), 10, _LLAVA_IMAGE)
    # llava-hf/llava-v1.6-mistral-7b-hf shapes (base resolution only; no AnyRes): mlp2x_gelu, vocab 32064.
    add("llava_v1.6_mistral_7b_clip336", "clip", clip336, projector_preset("llava_mlp2x_gelu"),
        _lm("mistral_7b", vocab_size=32064), 32000, _LLAVA_IMAGE)

    internvit6b = _vision("internvit", "internvit_6b_448px_v1_5")
    add("nvlm_d_34b", "internvit", internvit6b, projector_preset("nvlm_d_34b"), _lm("yi_34b"), 63999,
        _NVLM_IMAGE)
    add("nvlm_d_72b", "internvit", internvit6b, projector_preset("nvlm_d_72b"), _lm("qwen2_72b"), 151654,
        _NVLM_IMAGE)

    c_radio = _vision("radio", "c_radio_v2_h", image_size=512)
    add("nemotron_nano_vl_8b", "radio", c_radio, projector_preset("nemotron_nano_vl_8b"), _lm("llama3.1_8b"),
        128002, dataclasses.replace(_NEMOTRON_IMAGE, tile_tags="none"))

    # Tiny models for tests and CPU runs: the debug LM (vocab 2048 = the bundled tokenizer), the last
    # id as image placeholder.
    debug_lm = _lm("debug")
    add("debug_vlm", "clip", _vision("clip", "debug_clip"),
        ProjectorArgs(vision_dim=64, hidden_dim=256, output_dim=debug_lm.dim), debug_lm, 2047,
        ImageArgs(preset="clip_336", tile_size=32))
    add("debug_vlm_siglip", "siglip", _vision("siglip", "debug_siglip"),
        ProjectorArgs(vision_dim=64, hidden_dim=256, output_dim=debug_lm.dim), debug_lm, 2047,
        ImageArgs(preset="siglip_384", tile_size=36))
    add("debug_vlm_internvit", "internvit", _vision("internvit", "debug_internvit"),
        ProjectorArgs(vision_dim=64, hidden_dim=256, output_dim=debug_lm.dim, bias=False, layer_norm=True,
                      pixel_shuffle=True), debug_lm, 2047,
        dataclasses.replace(_NVLM_IMAGE, tile_size=56, max_tiles=2))
    add("debug_vlm_radio", "radio", _vision("radio", "debug_radio", image_size=64),
        ProjectorArgs(vision_dim=64, hidden_dim=256, output_dim=debug_lm.dim, layer_norm=True, pixel_shuffle=True),
        debug_lm, 2047, dataclasses.replace(_NEMOTRON_IMAGE, tile_size=64, max_tiles=2))
    # `python -m titanmm.demo`: a 2-block CLIP-like tower on 64x64 images (8x8 patches of 8 px, the last
    # block's features), pixel shuffle to 16 image tokens, and the demo language model.
    demo_lm = _lm("demo_lm")
    add("demo_vlm", "clip", _vision("clip", "debug_clip", image_size=64, num_layers=2, select_layer=-1),
        ProjectorArgs(vision_dim=64, hidden_dim=256, output_dim=demo_lm.dim, pixel_shuffle=True), demo_lm, 2047,
        ImageArgs(preset="clip_336", tile_size=64))
    return flavors


VLM_FLAVORS: dict[str, VLMArgs] = _build()
