"""benchmarks/vlm_loader.py on a tiny run: COCO-like JPEGs -> convert_llava -> the trainer's energon loader (in
the test process: a worker process takes seconds to shut down), a results file with the documented fields."""

from __future__ import annotations

import io
import json

import pytest

from tests.utils import load_benchmark

pytest.importorskip("megatron.energon")


vlm_loader = load_benchmark("vlm_loader")


def test_coco_like_jpeg_has_a_photo_like_size():
    import numpy as np
    from PIL import Image

    data = vlm_loader.coco_like_jpeg(np.random.default_rng(0), 640, 480)
    assert Image.open(io.BytesIO(data)).size == (640, 480) and 60_000 < len(data) < 250_000


def test_tiny_run_writes_results(tmp_path):
    out = vlm_loader.main(["--images", "6", "--seconds", "0.3", "--warmup", "0", "--workers", "0",
                           "--cases", "clip336_sft_packed", "--packing-buffer-size", "4",
                           "--results-dir", str(tmp_path)])
    (path,) = tmp_path.glob("*_cpu_vlm_loader.json")
    assert json.loads(path.read_text()) == out
    assert out["device"].startswith("cpu: ") and out["command"].startswith("python benchmarks/vlm_loader.py")
    result = out["results"]["clip336_sft_packed"]
    (run,) = result["runs"]
    assert run["num_workers"] == 0 and run["packing_buffer_size"] == 4 and run["samples"] > 0
    assert run["worker_cpu_s"] is None and run["worker_peak_rss_mb"] is None  # no worker processes
    assert run["main_process_rss_mb"] > 0 and run["defer_pixels_when_packing"] is True
    assert run["samples_per_s"] > 0 and run["tiles_per_sample"] == 1.0 and run["skipped_samples"] == 0
    assert run["pixel_mb_per_sample"] == pytest.approx(3 * 336 * 336 * 4 / 2**20, abs=0.01)
    assert 0 < run["packing_efficiency"] <= 1
    needed = result["workers_needed_per_gpu"]["llava_sft_seq4096_h100"]
    assert needed["samples_per_s"] == 4.8 and needed["by_wall_rate"] >= 1
