"""Packing efficiency of titanmm's VLM sample packing on simulated LLaVA sample lengths (CPU, ~1 minute).

    python benchmarks/vlm_packing.py [--samples 200000] [--seed 0] [--seq-lens 2048 4096] \
        [--buffer-sizes 16 32 64 96 128]

Packing efficiency is the non-pad fraction of the training tokens, the `packing_efficiency` of
`VLMData.pop_metrics`: sum of the packed samples' lengths / (packed rows * seq_len) (every packed row is padded
to seq_len, so the batch size does not enter).

What is simulated. Only sample lengths: a sample's length is what `VLMTaskEncoder.encode_sample` makes,
len(input_ids) = image tokens + text tokens (chat template included) - 1 (the next-token shift). Samples longer
than seq_len are skipped by the encoder ("too_long") before they reach the packing buffer, and so here. The
stream is drawn i.i.d. from the mixture (energon's shard and sample shuffling approximate that), seeded.

How the samples become rows: the real `VLMTaskEncoder.select_samples_to_pack` (titanmm.data.energon) groups
each buffer, and `simulate_energon_packing` forms rows exactly as megatron-energon's `PackingDataset`
(megatron/energon/wrappers/packing_dataset.py, energon 7.4.1) does:

* encoded samples go into a reading buffer until it holds `packing_buffer_size` of them;
* when no selected group is pending, the whole buffer goes to `select_samples_to_pack` and is cleared; every
  non-empty returned group is queued, and each becomes one packed row (`pack_selected_samples`), in the
  returned order, while the reading buffer refills with the next samples of the stream;
* only once the queue is empty is the next (full) buffer selected. Selection rounds are therefore consecutive,
  disjoint chunks of `packing_buffer_size` samples; at the end of a finite stream the partial last buffer is
  selected the same way;
* a sample the selection does not return is dropped (energon clears the buffer), and nothing can be held back
  for the next round: samples kept by the task encoder would not be in energon's checkpoint (only its buffers'
  restore keys are), so a resumed run would lose them. The simulation checks that no sample is dropped or
  duplicated and that no row exceeds seq_len.

`bound` is an upper limit for any selection under these rounds: ceil(round tokens / seq_len) rows per round
(not always reachable: e.g. 576-token captions fit at most 6 to a 4096 row). `first_fit_decreasing_efficiency`
is what first-fit decreasing alone (titanmm's packing before `greedy_knapsack` filled each row most) reaches on
the same rounds.

Distributions (text tokens include the chat template's tokens; every image is CLIP ViT-L/14@336 = 576 tokens):

* `llava_665k_sft`: LLaVA-1.5's llava_v1_5_mix665k, by its published parts (LLaVA-1.5 paper, Table 7; counts
  in thousands) with text-length models that follow how LLaVA-1.5 built each part (several questions about one
  image are merged into one multi-turn conversation; short-answer VQA turns carry the "Answer the question
  using a single word or phrase." prompt). See `LLAVA_665K_SFT`. The lengths are modelled, not measured.
* `llava_558k_captions`: LLaVA-Pretrain blip_laion_cc_sbu_558k for projector pretraining (the captioning
  task): one image + a BLIP caption of ~10-60 tokens + ~6 template tokens.

Writes benchmarks/results/<date>_cpu_vlm_packing.json (workload, device, date, commit, command, numbers).
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from results_io import command_line, commit, cpu_description, write_results  # noqa: E402

IMAGE_TOKENS = 576  # CLIP ViT-L/14 at 336 px: 24 x 24 patches, class token dropped (llava_mistral_7b_clip336)


@dataclass(frozen=True)
class LogNormal:
    """Text tokens ~ round(exp(N(log(median), sigma))), clipped to [low, high]."""

    median: float
    sigma: float
    low: int
    high: int

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        values = np.exp(rng.normal(math.log(self.median), self.sigma, n))
        return np.clip(np.round(values), self.low, self.high).astype(np.int64)


@dataclass(frozen=True)
class Turns:
    """Text tokens of a merged multi-turn conversation: 1 + Poisson(extra_turns) turns (at most max_turns), each
    turn (question + answer + template) uniform in [low, high] tokens."""

    extra_turns: float
    low: int
    high: int
    max_turns: int = 30

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        turns = np.minimum(1 + rng.poisson(self.extra_turns, n), self.max_turns)
        per_turn = rng.integers(self.low, self.high + 1, size=(n, self.max_turns))
        return np.where(np.arange(self.max_turns) < turns[:, None], per_turn, 0).sum(axis=1)


@dataclass(frozen=True)
class Part:
    """One part of a data mixture: `thousands` of samples with `images` images each and a text-length model."""

    name: str
    thousands: float
    images: int
    text: LogNormal | Turns


# LLaVA-1.5 mix665k. Parts and sizes: LLaVA-1.5 paper, Table 7. Text models (assumptions, documented here):
LLAVA_665K_SFT = (
    # LLaVA-Instruct-158K: GPT-4 written conversations (2-4 rounds), detailed descriptions, complex reasoning.
    Part("llava_instruct_conversation", 58, 1, LogNormal(200, 0.5, 40, 1500)),
    Part("llava_instruct_detail", 23, 1, LogNormal(150, 0.35, 60, 500)),
    Part("llava_instruct_reasoning", 77, 1, LogNormal(170, 0.35, 60, 600)),
    # ShareGPT: text-only conversations, a few hundred to a few thousand tokens (long tail; those longer than
    # seq_len are skipped as too_long by the encoder).
    Part("sharegpt", 40, 0, LogNormal(900, 0.8, 150, 8000)),
    # Short-answer VQA, all questions of an image merged into one conversation ("tens to hundreds" of tokens).
    Part("vqav2", 83, 1, Turns(4.3, 22, 32)),
    Part("gqa", 72, 1, Turns(8.0, 20, 30)),
    Part("okvqa", 9, 1, Turns(0.5, 28, 40)),
    Part("ocrvqa", 80, 1, Turns(4.0, 20, 30)),
    # Multiple choice ("Answer with the option's letter from the given choices directly."), mostly one turn.
    Part("aokvqa", 66, 1, Turns(0.3, 50, 70)),
    # One caption ("Provide a one-sentence caption for the provided image.").
    Part("textcaps", 22, 1, Turns(0.0, 35, 60)),
    # Region descriptions / grounding with box coordinates, several regions per image.
    Part("refcoco", 48, 1, Turns(3.0, 30, 50)),
    Part("vg", 86, 1, Turns(4.0, 28, 42)),
)
# LLaVA-Pretrain blip_laion_cc_sbu_558k (captioning task): the image, a BLIP caption of ~10-60 tokens and ~6
# template tokens (bos, [INST], "\n", [/INST], eos).
CAPTION_TEMPLATE_TOKENS = 6
LLAVA_558K_CAPTIONS = (
    Part("blip_laion_cc_sbu", 558, 1, LogNormal(20 + CAPTION_TEMPLATE_TOKENS, 0.4, 10 + CAPTION_TEMPLATE_TOKENS,
                                                60 + CAPTION_TEMPLATE_TOKENS)),
)
DISTRIBUTIONS = {"llava_665k_sft": LLAVA_665K_SFT, "llava_558k_captions": LLAVA_558K_CAPTIONS}


def sample_lengths(parts: Sequence[Part], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, part index) of `n` samples drawn i.i.d. from the mixture, in stream order; a length is
    len(input_ids) of the encoded sample (image tokens + text tokens - 1)."""
    rng = np.random.default_rng(seed)
    weights = np.array([p.thousands for p in parts], dtype=np.float64)
    which = rng.choice(len(parts), size=n, p=weights / weights.sum())
    lengths = np.zeros(n, dtype=np.int64)
    for k, part in enumerate(parts):
        chosen = which == k
        lengths[chosen] = part.images * IMAGE_TOKENS + part.text.draw(rng, int(chosen.sum())) - 1
    return lengths, which


def llava_encoder(seq_len: int):
    """A real `VLMTaskEncoder` of the LLaVA flavor (shipped tokenizer; only its packing selection is used)."""
    from titanmm.data.energon import VLMTaskEncoder
    from titanmm.data.tokenizer import build_tokenizer
    from titanmm.models import get_model_spec

    args = get_model_spec("vlm").flavors["llava_mistral_7b_clip336"]
    return VLMTaskEncoder(build_tokenizer(""), "plain", args.image, args.image_token_id, IMAGE_TOKENS, seq_len)


def simulate_energon_packing(lengths: Sequence[int], buffer_size: int,
                             select: Callable[[list[dict]], list[list[dict]]], seq_len: int) -> dict:
    """Packed rows of a stream of encoded-sample lengths, formed as energon's PackingDataset forms them (see the
    module docstring): consecutive rounds of `buffer_size` samples, each handed to `select`, each returned
    group one row in the returned order. Raises when a sample is dropped or duplicated or a row is too long.

    Returns {"rows": [[sample index, ...] per row], "round_bound_rows": sum over rounds of
    ceil(round tokens / seq_len), "select_seconds": time spent in `select`}.
    """
    import torch

    rows, bound_rows, select_seconds = [], 0, 0.0
    for start in range(0, len(lengths), buffer_size):
        indices = range(start, min(start + buffer_size, len(lengths)))
        buffer = [{"input_ids": torch.empty(int(lengths[i]), dtype=torch.int32), "__keys__": [i]} for i in indices]
        began = time.perf_counter()
        groups = select(buffer)
        select_seconds += time.perf_counter() - began
        emitted = [s["__keys__"][0] for group in groups for s in group]
        if sorted(emitted) != list(indices):
            raise AssertionError(f"round at sample {start}: the selection returned {sorted(emitted)} of "
                                 f"{list(indices)} (energon drops what is not returned)")
        for group in groups:
            if group:  # energon skips empty groups
                row = [s["__keys__"][0] for s in group]
                if sum(int(lengths[i]) for i in row) > seq_len:
                    raise AssertionError(f"row {row} exceeds seq_len {seq_len}")
                rows.append(row)
        bound_rows += math.ceil(sum(int(lengths[i]) for i in indices) / seq_len)
    return {"rows": rows, "round_bound_rows": bound_rows, "select_seconds": select_seconds}


def first_fit_decreasing_selection(seq_len: int) -> Callable[[list[dict]], list[list[dict]]]:
    """A `select_samples_to_pack` by `energon.first_fit_decreasing` alone (the bins of titanmm's packing before
    `greedy_knapsack` filled each bin most), for comparison."""
    from titanmm.data.energon import first_fit_decreasing

    def select(samples: list[dict]) -> list[list[dict]]:
        bins = first_fit_decreasing([len(s["input_ids"]) for s in samples], seq_len)
        return [[samples[i] for i in group] for group in bins]

    return select


def measure(lengths: np.ndarray, seq_len: int, buffer_size: int) -> dict:
    """Packing statistics of one (stream, seq_len, buffer size) through the encoder's selection (and, for
    comparison, first-fit decreasing)."""
    kept = lengths[lengths <= seq_len]
    encoder = llava_encoder(seq_len)
    packed = simulate_energon_packing(kept, buffer_size, encoder.select_samples_to_pack, seq_len)
    previous = simulate_energon_packing(kept, buffer_size, first_fit_decreasing_selection(seq_len), seq_len)
    rows = packed["rows"]
    tokens = int(kept.sum())
    rounds = math.ceil(len(kept) / buffer_size)
    return {
        "seq_len": seq_len,
        "buffer_size": buffer_size,
        "efficiency": round(tokens / (len(rows) * seq_len), 4),
        "bound": round(tokens / (packed["round_bound_rows"] * seq_len), 4),
        "first_fit_decreasing_efficiency": round(tokens / (len(previous["rows"]) * seq_len), 4),
        "samples_per_row": round(len(kept) / len(rows), 3),
        "rows": len(rows),
        "samples": len(kept),
        "skipped_too_long": int(len(lengths) - len(kept)),
        "select_ms_per_round": round(1000 * packed["select_seconds"] / rounds, 3),
    }


def distribution_summary(lengths: np.ndarray, which: np.ndarray, parts: Sequence[Part]) -> dict:
    """Mean / percentiles of the sample lengths and each part's share and mean length."""
    percentiles = np.percentile(lengths, [5, 50, 95, 99]).round().astype(int).tolist()
    return {
        "mean_length": round(float(lengths.mean()), 1),
        "p5_p50_p95_p99": percentiles,
        "parts": {p.name: {"share": round(float((which == k).mean()), 4), "images": p.images,
                           "mean_length": round(float(lengths[which == k].mean()), 1),
                           "text_model": {"kind": type(p.text).__name__, **p.text.__dict__}}
                  for k, p in enumerate(parts)},
    }


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=200_000, help="samples drawn per distribution")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--buffer-sizes", type=int, nargs="+", default=[16, 32, 64, 96, 128])
    p.add_argument("--distributions", nargs="+", default=list(DISTRIBUTIONS), choices=list(DISTRIBUTIONS))
    p.add_argument("--results-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--no-write", action="store_true", help="print the results only")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from titanmm.config.job_config import Multimodal

    started = time.perf_counter()
    results = {}
    for name in args.distributions:
        parts = DISTRIBUTIONS[name]
        lengths, which = sample_lengths(parts, args.samples, args.seed)
        runs = []
        for seq_len in args.seq_lens:
            for buffer_size in args.buffer_sizes:
                run = measure(lengths, seq_len, buffer_size)
                runs.append(run)
                print(f"{name:20s} seq_len {seq_len:5d} buffer {buffer_size:4d}: efficiency {run['efficiency']:.4f} "
                      f"(bound {run['bound']:.4f}, first-fit decreasing {run['first_fit_decreasing_efficiency']:.4f}), "
                      f"{run['samples_per_row']:.2f} samples/row, "
                      f"{run['select_ms_per_round']:.2f} ms/selection", flush=True)
        results[name] = {"distribution": distribution_summary(lengths, which, parts), "runs": runs}
    date = datetime.date.today().isoformat()
    out = {
        "workload": "vlm_packing: packing efficiency (non-pad token fraction) of VLMTaskEncoder.select_samples_to_pack "
                    "in energon's PackingDataset rounds, simulated LLaVA-665K SFT and LLaVA-558K caption lengths "
                    f"({IMAGE_TOKENS} image tokens per image)",
        "device": cpu_description(),
        "date": date,
        "commit": commit(),
        "command": command_line("vlm_packing.py", argv),
        "samples_per_distribution": args.samples,
        "seed": args.seed,
        "default_packing_buffer_size": Multimodal().packing_buffer_size,
        "runtime_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    if not args.no_write:
        write_results(out, Path(args.results_dir) / f"{date}_cpu_vlm_packing.json")
    return out



if __name__ == "__main__":
    main()
