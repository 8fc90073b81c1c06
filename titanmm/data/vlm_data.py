"""Image-text training data of a vision-language model for one data-parallel rank, step after step.

    data = build_vlm_data(config, model_args, tokens_per_tile, dp_rank, dp_degree, grad_accum_steps, dp_group)
    for step in range(start, steps):
        micro_batches = data.microbatches(step)   # grad_accum_steps dicts of tensors (below)
    data.state_dict() / data.load_state_dict()    # "dataloader" of the DCP checkpoint
    data.pop_metrics()                            # samples, packing efficiency, skips (all dp ranks)

`training.dataset = "mock"` gives `MockVLMBatcher` (random samples, a function of the step). Anything else
is an energon dataset (a prepared folder or a metadataset .yaml) read by `VLMData`:

* Sharding. energon's `WorkerConfig(rank=dp_rank, world_size=dp_degree, num_workers=multimodal.num_workers)`
  splits the shards over all (data-parallel rank, worker) pairs, so data-parallel ranks read disjoint
  samples; tensor-parallel ranks of one data-parallel group build the very same loader (same rank, seed and
  settings) and therefore see identical batches. The shuffle seed is `seed_offset = training.seed`.
* A stream. Unlike the text data, which is a function of the step, an energon loader is consumed in order:
  `microbatches(step)` must be called for steps 0, 1, 2, ... (or from the checkpoint's step on).
* Micro-batches: input_ids, labels, position_ids, document_ids [B, seq_len]; pixel_values [tiles, 3, H, W]
  (all tiles of the micro-batch, row after row); num_tiles [images], images_per_sample [B],
  tiles_per_sample [B]; with `multimodal.loss_scaling = "sqrt_length"` also loss_weights [B, seq_len]
  (`loss_weights.sqrt_length_weights`). The sample keys of the last step are in `last_sample_keys`.
* Resume. `state_dict()` gathers every data-parallel rank's `SavableDataLoader.save_state_rank()` (energon's
  per-rank loader state: shard positions, shuffle buffers, worker RNGs) over the data-parallel group and
  returns them as one pickled blob, identical on all ranks (DCP keeps one copy). On load each rank restores
  its own entry, so a resume with the same layout and data settings continues with exactly the batches the
  uninterrupted run would have seen. If the data-parallel degree, the number of workers or a data setting
  (`SETTINGS`) differs, energon's state cannot be mapped onto the new layout: a warning names what changed
  and the data stream restarts from a fresh shuffle (`seed_offset = training.seed + step`), as Megatron-LM
  does when it cannot restore a data loader; model, optimizer and step resume as usual.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import warnings
from collections import Counter

import torch
import torch.distributed as dist

from titanmm.data.loss_weights import sqrt_length_weights

logger = logging.getLogger(__name__)

TASKS = ("sft", "captioning")
LOSS_SCALINGS = ("token", "sqrt_length")
# Micro-batch entries handed to the trainer (the batch dict also has keys and skip counts).
TENSOR_KEYS = ("input_ids", "labels", "position_ids", "document_ids", "pixel_values", "num_tiles",
               "images_per_sample", "tiles_per_sample")
# Data settings that define the sample stream: a resume with any of them changed restarts the stream.
SETTINGS = ("dataset", "seq_len", "local_batch_size", "seed", "chat_template", "task", "max_tiles", "packing",
            "packing_buffer_size", "shuffle_buffer_size", "max_samples_per_sequence", "num_workers")
# Chat template of a language model family, by the name of its flavor (first matching prefix).
_FAMILY_TEMPLATES = (("llama3.1", "llama3.1"), ("llama3.2", "llama3.1"), ("llama3", "llama3"), ("mistral", "mistral"),
                     ("yi", "nvlm-yi-34b"), ("qwen2", "qwen2"))


def language_model_flavor(lm_args) -> str | None:
    """The name of the Llama-family flavor a language model was made from (vocabulary size and depth aside)."""
    from titanmm.models.llama.flavors import LLAMA_FLAVORS

    for name, args in LLAMA_FLAVORS.items():
        if dataclasses.replace(args, vocab_size=lm_args.vocab_size, n_layers=lm_args.n_layers) == lm_args:
            return name
    return None


def default_chat_template(vlm_args) -> str | None:
    """The chat template of a VLM's language model family (`multimodal.chat_template = ""`), or None.

    mistral -> "mistral", yi -> "nvlm-yi-34b", qwen2 -> "qwen2", llama3.1 / 3.2 -> "llama3.1", llama3 ->
    "llama3"; the debug language model (whose tokenizer has no chat tokens) -> "plain".
    """
    name = language_model_flavor(vlm_args.lm)
    if name is None:
        return None
    if name == "debug":
        return "plain"
    name = name.removeprefix("debug_")
    return next((template for prefix, template in _FAMILY_TEMPLATES if name.startswith(prefix)), None)


def tiles_by_sample(pixel_values: torch.Tensor, tiles_per_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 3, H, W] tiles of a micro-batch + tiles_per_sample [B] -> ([B, N, 3, H, W] zero-padded to the most
    tiles N of a sample, tile_mask [B, N]), the by-sample form `VisionLanguageModel.forward` also takes (for
    splitting a micro-batch along the batch, e.g. into pipeline microbatches)."""
    counts = tiles_per_sample.tolist()
    most = max(counts, default=0)
    pixels = pixel_values.new_zeros(len(counts), most, *pixel_values.shape[1:])
    mask = torch.zeros(len(counts), most, dtype=torch.bool)
    for row, tiles in enumerate(torch.split(pixel_values, counts)):
        pixels[row, :len(tiles)] = tiles
        mask[row, :len(tiles)] = True
    return pixels, mask


class VLMData:
    """Micro-batches of an energon image-text dataset for one data-parallel rank (see the module docstring).

    Args:
        config: the job config (training.dataset / seq_len / local_batch_size / seed and [multimodal]).
        model_args: the VLM's args (image settings, image token id, language model for the chat template).
        tokens_per_tile: image tokens per tile of the model.
        tokenizer: titanmm tokenizer.
        dp_rank, dp_degree: this rank's data-parallel rank and the data-parallel degree.
        grad_accum_steps: micro-batches per step.
        dp_group: the data-parallel process group (state gathering and metrics); None without one.
    """

    def __init__(self, config, model_args, tokens_per_tile: int, tokenizer, dp_rank: int = 0, dp_degree: int = 1,
                 grad_accum_steps: int = 1, dp_group=None):
        t, m = config.training, config.multimodal
        template = m.chat_template or default_chat_template(model_args)
        if template is None:
            raise ValueError("multimodal.chat_template is empty and the model's language model has no default "
                             "chat template; set one")
        self.model_args, self.tokens_per_tile, self.tokenizer = model_args, tokens_per_tile, tokenizer
        self.dp_rank, self.dp_degree, self.dp_group = dp_rank, dp_degree, dp_group
        self.grad_accum_steps = grad_accum_steps
        self.sqrt_length = m.loss_scaling == "sqrt_length"
        self.settings = {"dataset": t.dataset, "seq_len": t.seq_len, "local_batch_size": t.local_batch_size,
                         "seed": t.seed, "chat_template": template, "task": m.task, "max_tiles": m.max_tiles,
                         "packing": m.packing, "packing_buffer_size": m.packing_buffer_size if m.packing else None,
                         "shuffle_buffer_size": m.shuffle_buffer_size,
                         "max_samples_per_sequence": m.max_samples_per_sequence, "num_workers": m.num_workers}
        self.seed_offset = t.seed
        self.next_step = 0
        self.skipped: Counter = Counter()  # this rank's skipped samples since the start of the run, by reason
        self.last_sample_keys: list[list[str]] = []
        self._restore = None  # energon loader state to restore when the loader starts
        self._loader = None
        self._iterator = None
        self._window_tokens = [0, 0]  # non-pad and all tokens since the last pop_metrics
        self._window_samples = 0  # samples (packed ones counted one by one) since the last pop_metrics

    # -- the loader -----------------------------------------------------------------------------

    def encoder(self):
        """The `VLMTaskEncoder` of these settings."""
        from titanmm.data.energon import VLMTaskEncoder

        s = self.settings
        return VLMTaskEncoder(self.tokenizer, s["chat_template"], self.model_args.image,
                              self.model_args.image_token_id, self.tokens_per_tile, s["seq_len"], task=s["task"],
                              max_tiles=s["max_tiles"])

    def _start(self) -> None:
        from megatron.energon import WorkerConfig, get_savable_loader, get_train_dataset

        s = self.settings
        worker_config = WorkerConfig(rank=self.dp_rank, world_size=self.dp_degree, num_workers=s["num_workers"],
                                     seed_offset=self.seed_offset)
        dataset = get_train_dataset(os.path.expanduser(s["dataset"]), worker_config=worker_config,
                                    batch_size=s["local_batch_size"],
                                    shuffle_buffer_size=s["shuffle_buffer_size"] or None,
                                    max_samples_per_sequence=s["max_samples_per_sequence"] or None,
                                    packing_buffer_size=s["packing_buffer_size"], task_encoder=self.encoder())
        if not torch.cuda.is_available():  # energon always asks for pinned memory, which CPU runs do not have
            warnings.filterwarnings("ignore", message="'pin_memory' argument is set as true but no accelerator")
        self._loader = get_savable_loader(dataset)
        if self._restore is not None:
            self._loader.restore_state_rank(self._restore)
            self._restore = None
        self._iterator = iter(self._loader)

    def microbatches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's grad_accum_steps micro-batches of `step` (the steps come in order; see the module doc)."""
        if step != self.next_step:
            raise RuntimeError(f"the energon data is a stream at step {self.next_step}; step {step} was asked for "
                               "(resume through a checkpoint to continue from a later step)")
        if self._iterator is None:
            self._start()
        micro_batches, self.last_sample_keys = [], []
        for _ in range(self.grad_accum_steps):
            batch = next(self._iterator)
            self.skipped.update(batch["skipped"])
            self.last_sample_keys.append(list(batch["__keys__"]))
            self._window_tokens[0] += int(batch["num_tokens"].sum())
            self._window_tokens[1] += batch["input_ids"].numel()
            self._window_samples += len(batch["__keys__"])  # one key per sample, also in packed rows
            mb = {key: batch[key] for key in TENSOR_KEYS}
            if self.sqrt_length:
                mb["loss_weights"] = sqrt_length_weights(mb["labels"], mb["document_ids"])
            micro_batches.append(mb)
        self.next_step += 1
        return micro_batches

    # -- checkpointing --------------------------------------------------------------------------

    def _rank_state(self) -> dict:
        loader_state = self._loader.save_state_rank() if self._loader is not None else self._restore
        return {"step": self.next_step, "seed_offset": self.seed_offset, "skipped": dict(self.skipped),
                "loader": loader_state}

    def state_dict(self) -> dict:
        """{"energon": pickled {"settings", "dp_degree", "ranks": [state of each dp rank]}} (a collective over
        the data-parallel group: every rank must call it)."""
        ranks = [None] * self.dp_degree
        if self.dp_degree > 1 and dist.is_initialized():
            dist.all_gather_object(ranks, self._rank_state(), group=self.dp_group)
        else:
            ranks = [self._rank_state()]
        return {"energon": pickle.dumps({"settings": self.settings, "dp_degree": self.dp_degree, "ranks": ranks})}

    def load_state_dict(self, state: dict) -> None:
        """Restore this rank's loader state, or restart the stream (with a warning) when the layout or the data
        settings differ from the checkpoint's."""
        saved = pickle.loads(state["energon"])
        step = saved["ranks"][0]["step"]
        changed = [f"{key}: checkpoint {saved['settings'].get(key)!r}, now {value!r}"
                   for key, value in self.settings.items() if saved["settings"].get(key) != value]
        if saved["dp_degree"] != self.dp_degree:
            changed.append(f"data-parallel degree: checkpoint {saved['dp_degree']}, now {self.dp_degree}")
        self.next_step = step
        if not changed:
            own = saved["ranks"][self.dp_rank]
            self.seed_offset, self._restore, self.skipped = own["seed_offset"], own["loader"], Counter(own["skipped"])
            return
        self.seed_offset = self.settings["seed"] + step
        self._restore = None
        self.skipped = sum((Counter(r["skipped"]) for r in saved["ranks"]), Counter()) if self.dp_rank == 0 \
            else Counter()
        if not dist.is_initialized() or dist.get_rank() == 0:
            logger.warning(f"the data loader state of step {step} does not fit this run ({'; '.join(changed)}): the "
                           f"data stream restarts from a new shuffle (seed offset {self.seed_offset}); samples seen "
                           "before the checkpoint may come again")

    # -- metrics --------------------------------------------------------------------------------

    def pop_metrics(self) -> dict:
        """Metrics since the previous call, over all data-parallel ranks (a collective over the data-parallel
        group): samples (the training samples in the micro-batches handed out since the previous call, summed
        over the data-parallel ranks; each sample of a packed row counts, so samples / window seconds is the
        job's samples/s), packing_efficiency (non-pad fraction of the tokens), skipped_samples (since the start
        of the run) and skipped_samples/<reason> for each reason seen."""
        from titanmm.data.energon import SKIP_REASONS
        from titanmm.distributed import all_reduce

        local = torch.tensor(self._window_tokens + [self._window_samples] + [self.skipped[r] for r in SKIP_REASONS],
                             dtype=torch.float64)
        total = all_reduce(local, group=self.dp_group) if self.dp_degree > 1 else local
        self._window_tokens, self._window_samples = [0, 0], 0
        real, padded, samples, *skips = total.tolist()
        metrics = {"samples": int(samples), "packing_efficiency": real / padded if padded else float("nan"),
                   "skipped_samples": int(sum(skips))}
        metrics.update({f"skipped_samples/{r}": int(n) for r, n in zip(SKIP_REASONS, skips) if n})
        return metrics

    def close(self) -> None:
        """Stop the loader's worker processes."""
        self._iterator, self._loader = None, None

    def __repr__(self) -> str:
        return (f"VLMData(dataset={self.settings['dataset']!r}, dp_rank={self.dp_rank}/{self.dp_degree}, "
                f"grad_accum_steps={self.grad_accum_steps}, {self.settings})")


def build_vlm_data(config, model_args, tokens_per_tile: int, dp_rank: int, dp_degree: int, grad_accum_steps: int,
                   dp_group=None):
    """`MockVLMBatcher` for training.dataset = "mock", else `VLMData` over the energon dataset."""
    from titanmm.config.loader import ConfigError, validate_energon_dataset
    from titanmm.data.tokenizer import build_tokenizer

    t = config.training
    if t.dataset == "mock":
        from titanmm.data.mock_multimodal import MockMultimodalDataset, MockVLMBatcher

        size = model_args.image.tile_size
        dataset = MockMultimodalDataset(model_args.lm.vocab_size, t.seq_len, model_args.image_token_id,
                                        tokens_per_tile, size, bos_id=model_args.lm.bos_token_id, seed=t.seed)
        # Pinned (where CUDA is) like energon's batches: a copy from pageable memory waits for the previous step.
        return MockVLMBatcher(dataset, t.local_batch_size, dp_rank, dp_degree, grad_accum_steps, seed=t.seed,
                              shuffle=False, prefetch=True, pin_memory=True)
    validate_energon_dataset(t.dataset)
    tokenizer = build_tokenizer(config.model.tokenizer_path)
    if tokenizer.vocab_size > model_args.lm.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                          f"{model_args.lm.vocab_size} (model.tokenizer_path / model.flavor)")
    return VLMData(config, model_args, tokens_per_tile, tokenizer, dp_rank, dp_degree, grad_accum_steps, dp_group)
