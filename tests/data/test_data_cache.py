"""The on-disk token cache: reuse, invalidation, atomic writes, rank-0 build under torch.distributed."""

from __future__ import annotations

import json
import os

import pytest
import torch.multiprocessing as mp

from data_testing import CharTokenizer, write_jsonl
from tests.utils import free_port, gloo_process_group
from titanmm.data import indexed
from titanmm.data.documents import resolve_source
from titanmm.data.indexed import load_or_build_token_cache


def count_builds(monkeypatch) -> list:
    builds = []
    real_build = indexed.build_token_cache

    def counting_build(source, tokenizer, folder):
        builds.append(folder)
        real_build(source, tokenizer, folder)

    monkeypatch.setattr(indexed, "build_token_cache", counting_build)
    return builds


def test_cache_is_reused_and_complete(tmp_path, cache_dir, monkeypatch):
    builds = count_builds(monkeypatch)
    source = resolve_source(write_jsonl(tmp_path / "a.jsonl", ["hello", "world"]))
    first = load_or_build_token_cache(source, CharTokenizer(), cache_dir)
    second = load_or_build_token_cache(resolve_source(tmp_path / "a.jsonl"), CharTokenizer(), cache_dir)
    assert len(builds) == 1 and first.folder == second.folder
    assert second.tokens.tolist() == first.tokens.tolist() and second.num_docs == 2
    assert sorted(os.listdir(first.folder)) == ["doc_starts.npy", "meta.json", "tokens.bin"]
    assert [p for p in os.listdir(first.folder.parent) if ".tmp-" in p] == []  # no temporary leftovers


def test_changing_a_file_the_tokenizer_or_the_field_rebuilds(tmp_path, cache_dir, monkeypatch):
    builds = count_builds(monkeypatch)
    path = write_jsonl(tmp_path / "a.jsonl", ["hello", "world"])
    first = load_or_build_token_cache(resolve_source(path), CharTokenizer(), cache_dir)
    write_jsonl(path, ["hello", "world", "again"])
    changed = load_or_build_token_cache(resolve_source(path), CharTokenizer(), cache_dir)
    assert len(builds) == 2 and changed.folder != first.folder and changed.num_docs == 3
    assert changed.content_hash != first.content_hash
    load_or_build_token_cache(resolve_source(path), CharTokenizer(bos=False), cache_dir)
    assert len(builds) == 3
    write_jsonl(path, ["hello", "world", "again"], field="body")
    assert load_or_build_token_cache(resolve_source(path, "body"), CharTokenizer(), cache_dir).num_docs == 3
    assert len(builds) == 4


def test_a_failed_build_leaves_nothing_behind(tmp_path, cache_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"other": "no text"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: no field 'text'"):
        load_or_build_token_cache(resolve_source(path), CharTokenizer(), cache_dir)
    assert os.listdir(cache_dir / "tokens") == []


def _distributed_worker(rank: int, world_size: int, port: int, path: str, cache_dir: str, out: str) -> None:
    from titanmm.data import indexed as worker_indexed

    with gloo_process_group(rank, world_size, port):
        built = []
        real_build = worker_indexed.build_token_cache
        worker_indexed.build_token_cache = lambda *a: (built.append(rank), real_build(*a))
        cache = worker_indexed.load_or_build_token_cache(resolve_source(path), CharTokenizer(), cache_dir)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump([len(built), cache.num_tokens], f)


@pytest.mark.slow
def test_only_rank_zero_builds_under_torch_distributed(tmp_path, cache_dir):
    path = write_jsonl(tmp_path / "a.jsonl", ["hello", "world"])
    mp.spawn(_distributed_worker, args=(2, free_port(), str(path), str(cache_dir), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results == [[1, 14], [0, 14]]  # [builds, tokens]: rank 1 waited and reused rank 0's cache
