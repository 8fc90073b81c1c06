"""Random image-text samples for vision-language benchmarks and tests (no files, no tokenisation).

Sample i (seeded by (seed, i)): `[bos] [image] * tokens_per_image * images_per_sample [text ...]`,
seq_len + 1 tokens in all, and `images_per_sample` random tiles [3, H, W]. Image positions and the
token before the first image never count in the loss, as in real captioning data.

`MockVLMBatcher` serves them as the energon path does: the tiles of a micro-batch concatenated,
pixel_values [tiles, 3, H, W], with `tiles_per_sample` [B].
"""

from __future__ import annotations

import numpy as np
import torch

from titanmm.data.mock import MOCK_NUM_SAMPLES
from titanmm.data.packed import IGNORE_INDEX, sample_dict
from titanmm.data.sampler import StepBatcher


class MockMultimodalDataset:
    def __init__(self, vocab_size: int, seq_len: int, image_token_id: int, tokens_per_image: int,
                 image_size: int, images_per_sample: int = 1, bos_id: int | None = None, seed: int = 0):
        image_tokens = tokens_per_image * images_per_sample
        if image_tokens + 2 > seq_len:
            raise ValueError(f"training.seq_len = {seq_len} cannot hold {images_per_sample} image(s) of "
                             f"{tokens_per_image} tokens plus text")
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.image_token_id, self.image_tokens = image_token_id, image_tokens
        self.image_size, self.images_per_sample, self.bos_id = image_size, images_per_sample, bos_id

    def __len__(self) -> int:
        return MOCK_NUM_SAMPLES

    @property
    def fingerprint(self) -> str:
        return (f"mock_multimodal|{self.vocab_size}|{self.seq_len}|{self.image_token_id}|{self.image_tokens}|"
                f"{self.image_size}|{self.images_per_sample}|{self.seed}")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.Generator(np.random.PCG64([self.seed, index]))
        text = rng.integers(0, self.vocab_size - 1, size=self.seq_len + 1, dtype=np.int64)
        text[text >= self.image_token_id] += 1  # never the image token
        prefix = [] if self.bos_id is None else [self.bos_id]
        window = np.concatenate([prefix, np.full(self.image_tokens, self.image_token_id), text])
        sample = sample_dict(window[:self.seq_len + 1], None)
        is_image_next = sample["labels"] == self.image_token_id
        sample["labels"][is_image_next | (sample["input_ids"] == self.image_token_id)] = IGNORE_INDEX
        pixels = rng.standard_normal((self.images_per_sample, 3, self.image_size, self.image_size))
        sample["pixel_values"] = torch.from_numpy(pixels.astype(np.float32))
        return sample


class MockVLMBatcher(StepBatcher):
    """A StepBatcher whose micro-batches hold all tiles as pixel_values [tiles, 3, H, W] (sample after sample)
    and tiles_per_sample [B], like the energon data of `titanmm.data.vlm_data`."""

    def _collate(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = super()._collate([{k: v for k, v in s.items() if k != "pixel_values"} for s in samples])
        pixels = torch.cat([s["pixel_values"] for s in samples])
        batch["pixel_values"] = pixels.pin_memory() if self.pin_memory else pixels
        batch["tiles_per_sample"] = torch.tensor([s["pixel_values"].shape[0] for s in samples], dtype=torch.long)
        return batch
