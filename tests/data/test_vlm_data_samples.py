"""`VLMData.pop_metrics()["samples"]`: the samples handed to the trainer since the previous call, every sample of a
packed row counted, summed over the data-parallel ranks (benchmarks/compare.py turns it into samples/s/GPU).

Uses the 12-record LLaVA dataset of tests/llava_data.py (two records have a corrupt image and are skipped).
"""

from __future__ import annotations

import pytest
import torch.multiprocessing as mp

pytest.importorskip("megatron.energon")

from tests.llava_data import write_llava_dataset  # noqa: E402
from tests.utils import REPO, free_port, gloo_process_group  # noqa: E402
from titanmm.config import load_config  # noqa: E402
from titanmm.data.vlm_data import build_vlm_data  # noqa: E402
from titanmm.models import get_model_spec  # noqa: E402

VLM = get_model_spec("vlm").flavors["debug_vlm"]
TOKENS_PER_TILE = 16  # debug_vlm: 32 px tiles


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return write_llava_dataset(tmp_path_factory.mktemp("llava_samples"))


def vlm_data(dataset, *overrides, rank=0, degree=1, accum=1):
    config = load_config(str(REPO / "train_configs" / "debug_vlm.toml"),
                         [f"--training.dataset={dataset}", "--training.local_batch_size=2",
                          "--multimodal.num_workers=0", "--multimodal.shuffle_buffer_size=0", *overrides])
    return build_vlm_data(config, VLM, TOKENS_PER_TILE, rank, degree, accum)


def samples_of(data, steps: range) -> int:
    """Samples in the micro-batches of `steps` (by their keys: one per sample, also in packed rows)."""
    count = 0
    for step in steps:
        data.microbatches(step)
        count += sum(len(keys) for keys in data.last_sample_keys)
    return count


@pytest.mark.parametrize("packing", [False, True])
def test_samples_per_window(llava, packing):
    overrides = ["--training.seq_len=160", "--multimodal.packing=true", "--multimodal.packing_buffer_size=6"] \
        if packing else ["--training.seq_len=128"]
    data = vlm_data(llava, *overrides, accum=2)
    first = samples_of(data, range(2))
    metrics = data.pop_metrics()
    assert metrics["samples"] == first
    if packing:  # several samples per row: more samples than rows (2 steps x 2 micro-batches x 2 rows)
        assert first > 8
    else:
        assert first == 8
    second = samples_of(data, range(2, 3))
    assert data.pop_metrics()["samples"] == second > 0  # the window restarts at each call
    assert data.pop_metrics()["samples"] == 0


def _dp_worker(rank, world, port, dataset, out):
    with gloo_process_group(rank, world, port):
        data = vlm_data(dataset, "--training.seq_len=128", rank=rank, degree=world)
        own = samples_of(data, range(2))
        out[rank] = (own, data.pop_metrics()["samples"])


def test_samples_are_summed_over_data_parallel_ranks(llava):
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_dp_worker, args=(2, free_port(), str(llava), out), nprocs=2, join=True)
        results = dict(out)
    total = sum(own for own, _ in results.values())
    assert total == 2 * 2 * 2  # 2 ranks x 2 steps x 2 rows, no packing
    assert all(reported == total for _, reported in results.values())
