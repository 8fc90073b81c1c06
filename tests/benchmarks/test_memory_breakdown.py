"""benchmarks/memory_breakdown.py on a hand-made snapshot pickle (another trainer's: no memory_stats beside it)."""

import pickle

import pytest

from tests.utils import load_benchmark

memory_breakdown = load_benchmark("memory_breakdown")
GIB = 1024**3


def test_summary_of_a_snapshot_without_stats(tmp_path, capsys):
    frames = [{"filename": "/opt/torchtitan/models/llama3/model.py", "line": 120, "name": "forward"}]
    snapshot = {"segments": [{"device": 0, "address": 0, "total_size": 4 * GIB, "blocks": [
                    {"address": 0, "size": 3 * GIB, "requested_size": 3 * GIB, "state": "active_allocated",
                     "frames": frames},
                    {"address": 3 * GIB, "size": GIB, "requested_size": GIB, "state": "inactive", "frames": []}]}],
                "device_traces": [[{"action": "alloc", "addr": 3 * GIB, "size": GIB, "frames": frames},
                                   {"action": "free_completed", "addr": 3 * GIB, "size": GIB, "frames": []}]]}
    path, out = tmp_path / "rank0_memory_snapshot.pickle", tmp_path / "peer" / "memory_peak.txt"
    path.write_bytes(pickle.dumps(snapshot))
    assert memory_breakdown.main([str(path), "--title", "torchtitan step 10", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text == out.read_text() and text.startswith("torchtitan step 10\n")
    assert "not saved with this snapshot; reserved at the snapshot 4.00 GiB in 1 segments" in text
    assert "reserved by stream" not in text  # one stream: nothing to tell apart
    assert "4.00 GiB requested in 2 allocations" in text  # the peak: both blocks alive before the free
    assert "models/llama3/model.py:120 forward" in text
    # Two streams' pools (FSDP2's reduce-scatter stream holding gradients beside the default stream's memory)
    snapshot["segments"].append({"device": 0, "address": 8 * GIB, "total_size": 2 * GIB, "stream": 0x5a,
                                 "blocks": [{"address": 8 * GIB, "size": GIB, "requested_size": GIB,
                                             "state": "active_allocated", "frames": []}]})
    path.write_bytes(pickle.dumps(snapshot))
    assert memory_breakdown.main([str(path)]) == 0
    assert ("reserved by stream at the snapshot (in use now): default stream 4.00 GiB (3.00 GiB), stream 0x5a "
            "2.00 GiB (1.00 GiB)") in capsys.readouterr().out
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(SystemExit):
        memory_breakdown.main([str(path)])
