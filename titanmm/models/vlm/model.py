"""A LLaVA-style vision-language model: vision tower -> projector -> language model.

    features  = vision(tiles)                         [T, N, C]  (T tiles of all images in the batch)
    images    = projector(features)                   [T, N', D] (optional pixel shuffle: N' = N / 4)
    h         = lm.tok_embeddings(input_ids)          [B, S, D]
    h[input_ids == image_token_id] = images, in order (one placeholder per image embedding)
    logits    = lm(h)                                 [B, S, V]

The data pipeline expands each image into exactly as many placeholder tokens as it has
embeddings (tile tags, if any, are ordinary text tokens around them), so merging is a scatter in
reading order: the k-th placeholder of the batch (row-major over [B, S]) gets the k-th embedding
of the tiles in the order they are stacked in `pixel_values`.

Plain single-device module; parallelism is applied from outside (titanmm.parallel.parallelize_vlm).
"""

from __future__ import annotations

import torch
from torch import nn

from titanmm.models.llama.model import Transformer
from titanmm.models.vlm.args import VLMArgs
from titanmm.models.vlm.projector import Projector


def build_vision_encoder(name: str, args) -> nn.Module:
    """The vision tower registered under `name`, built from its args."""
    from titanmm.models import get_model_spec

    return get_model_spec(name).model_cls(args)


def _require(ok: torch.Tensor, message: str) -> None:
    """ValueError(message) unless the boolean scalar `ok`; on an accelerator asserted on the device instead (reading
    it on the host would wait for the previous step)."""
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


class VisionLanguageModel(nn.Module):
    def __init__(self, args: VLMArgs):
        super().__init__()
        self.args = args
        self.vision = build_vision_encoder(args.vision_model, args.vision)
        self.projector = Projector(args.projector)
        self.lm = Transformer(args.lm)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                tile_mask: torch.Tensor | None = None,
                image_feature_index: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, S], pixel_values [T, 3, H, W] (all tiles of the batch, or None) -> logits [B, S, V]
        (or, given labels [B, S], their summed cross-entropy, computed without the logits: `LMHead`).

        A batch without images passes None, or (for FSDP training, where every rank must run the
        vision tower) an empty [0, 3, H, W] tensor. The tiles may also come by sample,
        [B, N, 3, H, W] (pipeline parallelism splits every input along the batch): all N are used,
        or those where `tile_mask` [B, N] is True when samples have fewer than N.

        position_ids / document_ids [B, S] are passed to the language model (packed sequences).
        image_feature_index [B, S]: the row of the image embeddings each image token takes, when the
        sequence is only a part of the batch's (context parallelism); by default they go in order.
        On a pipeline stage without the token embedding, `input_ids` holds the hidden states of the
        previous stage and the language model's blocks here take over (the images were used before).
        """
        if self.lm.tok_embeddings is None:
            return self.lm(input_ids, position_ids, document_ids, labels=labels)
        if pixel_values is not None and pixel_values.ndim == 5:
            pixel_values = pixel_values[tile_mask] if tile_mask is not None else pixel_values.flatten(0, 1)
        h_bsd = self.lm.tok_embeddings(input_ids)
        if pixel_values is not None and pixel_values.shape[0] == 0:
            # No images on this rank, but the tower must still run: under FSDP its parameter
            # all-gathers are collective with ranks that have images. One blank tile, weighted 0.
            blank_nd = self.encode_images(pixel_values.new_zeros(1, *pixel_values.shape[1:]))
            h_bsd = self.merge_image_embeddings(input_ids, h_bsd, None) + 0.0 * blank_nd.sum()
        else:
            images_nd = self.encode_images(pixel_values) if pixel_values is not None else None
            if image_feature_index is not None and images_nd is not None:
                h_bsd = self.merge_indexed_image_embeddings(input_ids, h_bsd, images_nd, image_feature_index)
            else:
                h_bsd = self.merge_image_embeddings(input_ids, h_bsd, images_nd)
        return self.lm.forward_embeddings(h_bsd, position_ids, document_ids, labels=labels)

    def encode_images(self, pixel_values_tchw: torch.Tensor) -> torch.Tensor:
        """Tiles [T, 3, H, W] -> image embeddings [T * N', D], tile after tile."""
        features_tnc = self.vision(pixel_values_tchw)
        grid_hw = self.patch_grid(*pixel_values_tchw.shape[-2:])
        images_tnd = self.projector(features_tnc, grid_hw)
        return images_tnd.flatten(0, 1)

    def merge_image_embeddings(self, input_ids: torch.Tensor, h_bsd: torch.Tensor,
                               images_nd: torch.Tensor | None) -> torch.Tensor:
        """Put the image embeddings, in order, where `input_ids == image_token_id`."""
        is_image_bs = input_ids == self.args.image_token_id
        num_embeddings = 0 if images_nd is None else images_nd.shape[0]
        _require(is_image_bs.sum() == num_embeddings,
                 f"the batch's count of image placeholder tokens (id {self.args.image_token_id}) differs from the "
                 f"{num_embeddings} embeddings the images give; the data pipeline must expand every image into "
                 f"exactly {self.tokens_per_tile_hint()} placeholders per tile")
        if images_nd is None:
            return h_bsd
        # The rows that take an image embedding, by a count known on the host: no wait for the device here, nor in
        # backward (masked_scatter's backward selects by the mask, which reads the count back).
        rows_n = torch.nonzero_static(is_image_bs.flatten(), size=num_embeddings).squeeze(1)
        return h_bsd.flatten(0, 1).index_copy(0, rows_n, images_nd.to(h_bsd.dtype)).view_as(h_bsd)

    def merge_indexed_image_embeddings(self, input_ids: torch.Tensor, h_bsd: torch.Tensor, images_nd: torch.Tensor,
                                       image_feature_index_bs: torch.Tensor) -> torch.Tensor:
        """Image token (b, s) takes `images_nd[image_feature_index_bs[b, s]]` (a slice of the batch's sequence, as
        under context parallelism, holds an unknown share of the images; text positions hold -1)."""
        is_image_bs = input_ids == self.args.image_token_id
        _require((image_feature_index_bs < images_nd.shape[0]).all(),
                 f"an image token takes an image embedding past the {images_nd.shape[0]} the images give; the data "
                 f"pipeline must expand every image into exactly {self.tokens_per_tile_hint()} placeholders per tile")
        rows_bs = image_feature_index_bs.clamp(min=0)
        images_bsd = images_nd.to(h_bsd.dtype).index_select(0, rows_bs.flatten()).view_as(h_bsd)
        return torch.where(is_image_bs.unsqueeze(-1), images_bsd, h_bsd)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of patch features the vision tower returns for an H x W tile."""
        patch = self.args.vision.patch_size
        return height // patch, width // patch

    def tokens_per_tile(self, height: int, width: int) -> int:
        """Image embeddings (= placeholder tokens) per H x W tile."""
        return self.projector.num_tokens(self.vision.num_patches(height, width))

    def tokens_per_tile_hint(self) -> str:
        size = self.args.image.tile_size
        try:
            return f"{self.tokens_per_tile(size, size)} (for {size}x{size} tiles)"
        except ValueError:
            return "tokens_per_tile(H, W)"

    def tie_weights(self) -> None:
        self.lm.tie_weights()

    @torch.no_grad()
    def init_weights(self, seed: int = 0, buffer_device: torch.device | None = None) -> None:
        """Deterministic, layout-independent initialisation of all three parts (and the LM's RoPE table).

        Each parameter's values depend only on its name and the seed, so a pipeline stage holding part
        of the model initialises it exactly as the whole model would."""
        if self.vision is not None:  # pipeline stages after the first have neither
            self.vision.init_weights(seed)
            self.projector.init_weights(seed)
        self.lm.init_weights(seed, buffer_device=buffer_device)
