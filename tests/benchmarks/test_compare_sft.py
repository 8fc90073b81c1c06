"""benchmarks/compare.py's LLaVA SFT workload (`llava_mistral_clip336_sft`) on CPU: the commands of its plan, the
samples/s/GPU summary of both sides from canned outputs, and a whole `main()` with the processes faked."""

from __future__ import annotations

import json

import pytest

from tests.utils import load_benchmark

H200 = "NVIDIA H200"
NAME = "llava_mistral_clip336_sft"


compare, readme_table = load_benchmark("compare"), load_benchmark("readme_table")
W = compare.WORKLOADS[NAME]


def titanmm_jsonl(steps=8, log_freq=1, samples=22, seconds=0.8, tps=5000.0, efficiency=0.97):
    """metrics.jsonl of titanmm's VLM run: a record every `log_freq` steps (and at step 1), `seconds` per step;
    every window has `samples` samples per step (over all ranks)."""
    logged = [1] + list(range(log_freq, steps + 1, log_freq))
    lines, previous = [], 0
    for step in dict.fromkeys(logged):
        lines.append(json.dumps({
            "step": step, "loss": 10.4, "tps_per_gpu": tps if step > 1 else 200.0, "tflops_per_gpu": 200.0,
            "mfu": 0.2, "peak_mem_gib": 60.0 + step, "peak_allocated_gib": 50.0 + step, "time": 1000.0 + step * seconds,
            "samples": samples * (step - previous), "packing_efficiency": efficiency, "skipped_samples": 0}))
        previous = step
    return "\n".join(lines)


def peer_output(samples_per_s=2.5, tokens=1900.0, padded=2100.0, reserved=70.0):
    result = {"gpus": 4, "batch": 2, "steps": 8, "warmup": 5, "timed_steps": 3, "seconds": 2.4, "ms_per_step": 800.0,
              "samples_per_s_per_gpu": samples_per_s, "tokens_per_s_per_gpu": tokens,
              "padded_tokens_per_s_per_gpu": padded, "padding_efficiency": tokens / padded, "samples": 24,
              "tokens": 18240, "padded_tokens": 20160, "peak_allocated_gib": reserved - 5,
              "peak_reserved_gib": reserved, "loss": 10.4, "grad_ckpt": False, "params": "fp32"}
    return ("[rank1]: some warning\nHF LLaVA SFT B=2 x 4 GPU(s), 3 timed steps: ...\n"
            f"HF LLaVA SFT result: {json.dumps(result)}\n")


def test_plan_builds_the_data_then_runs_both_sides_on_it(tmp_path):
    runs = compare.plan(W, 4, 20, tmp_path, titanmm_args=["--x=1"], peer_args=["--grad-ckpt"], warmup=6)
    assert [r.side for r in runs] == ["setup", "titanmm", "peer"]
    setup, titanmm, peer = (r.argv for r in runs)
    data = compare.sft_data_dir(W)
    assert runs[0].needed_by == ("titanmm", "peer")
    assert setup[1:] == ["benchmarks/llava_sft_data.py", str(data), "--samples=2000", "--seq-len=4096"]
    for flag in ("--nproc_per_node=4", "--config", "train_configs/llava_mistral_clip_sft.toml",
                 f"--training.dataset={data / 'energon'}", "--multimodal.packing=true", "--model.tokenizer_path=",
                 "--multimodal.chat_template=plain", "--training.seq_len=4096", "--training.local_batch_size=1",
                 "--parallelism.tensor_parallel_degree=1", "--checkpoint.initial_load_path=", "--compile.enable=true",
                 "--activation_checkpoint.mode=none", "--training.steps=20", "--x=1"):
        assert flag in titanmm, flag
    assert "--training.dataset=mock" not in titanmm and runs[1].output == tmp_path / "titanmm" / "metrics.jsonl"
    assert "--nproc_per_node=4" in peer and "benchmarks/hf_llava_sft.py" in peer
    assert peer[peer.index("--data") + 1] == str(data)
    assert {"--batch=2", "--steps=20", "--warmup=6", "--grad-ckpt"} <= set(peer)
    assert runs[2].env == compare.ALLOC_CONF


def test_dry_run_and_gpus(capsys):
    assert compare.main(["--workload", NAME, "--gpus", "8", "--steps", "12", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("--nproc_per_node=8") == 2 and "# setup: LLaVA SFT data" in out
    assert "--warmup=5" in out and "--steps=12" in out and "--training.steps=12" in out


def test_titanmm_windows_give_samples_per_second_per_gpu():
    records = compare.parse_titanmm_jsonl(titanmm_jsonl())
    s = compare.summarize_sft_windows(records, warmup=5, gpus=4)
    assert s["steps"] == [6, 8] and s["measured_steps"] == 3
    assert s["samples_per_s_per_gpu"] == pytest.approx(22 / 0.8 / 4)
    assert s["tps_per_gpu"] == pytest.approx(5000 * 0.97) and s["padded_tps_per_gpu"] == pytest.approx(5000)
    assert s["ms_per_step"] == pytest.approx(800) and s["samples_per_step"] == pytest.approx(22)
    assert s["peak_mem_gib"] == 68.0 and s["peak_allocated_gib"] == 58.0
    # windows of 10 steps: 11-20, 21-30 after 5 warm-up steps (1-10 starts inside the warm-up)
    s = compare.summarize_sft_windows(compare.parse_titanmm_jsonl(titanmm_jsonl(30, 10)), 5, 4, log_freq=10)
    assert s["steps"] == [20, 30] and s["measured_steps"] == 20
    assert s["samples_per_s_per_gpu"] == pytest.approx(22 / 0.8 / 4)
    with pytest.raises(ValueError, match="warm-up"):
        compare.summarize_sft_windows(records, warmup=8, gpus=4)
    with pytest.raises(ValueError, match="samples"):
        compare.summarize_sft_windows([{k: v for k, v in r.items() if k != "samples"} for r in records], 5, 4)


def test_summarize_both_sides_with_the_same_flops_count():
    errors = {}
    sides, extra = compare.summarize(W, {"titanmm": titanmm_jsonl(), "peer": peer_output()}, 5, H200, errors,
                                     gpus=4)
    assert errors == {}
    t, p = sides["titanmm"], sides["peer"]
    assert t["samples_per_s_per_gpu"] == pytest.approx(6.875) and p["samples_per_s_per_gpu"] == 2.5
    assert p["tps_per_gpu"] == 1900.0 and p["padded_tps_per_gpu"] == 2100.0 and p["peak_mem_gib"] == 70.0
    assert extra["ratio_of"] == "samples/s/GPU"
    assert extra["tokens_ratio"] == pytest.approx(5000 * 0.97 / 1900)
    assert extra["memory_ratio"] == pytest.approx(68 / 70)
    for side in (t, p):  # LM FLOPs per token at the side's own mean sample length
        mean = side["tps_per_gpu"] / side["samples_per_s_per_gpu"]
        assert side["mean_sample_tokens"] == pytest.approx(mean)
        flops = compare.vlm_flops_per_token(round(mean))
        assert side["tflops_per_gpu"] == pytest.approx(flops * side["tps_per_gpu"] / 1e12)
        assert side["mfu"] is not None and 0 < side["mfu"] < 1
    errors = {}
    sides, extra = compare.summarize(W, {"titanmm": titanmm_jsonl(), "peer": "CUDA out of memory"}, 5, H200, errors)
    assert sides["peer"] is None and "peer" in errors and sides["titanmm"] is not None
    assert "tokens_ratio" not in extra


def test_main_runs_the_setup_for_either_side_and_writes_the_samples_ratio(tmp_path, monkeypatch, capsys):
    ran = []

    def fake_execute(run, log, deadline):
        ran.append(run.side)
        if run.side == "titanmm":
            run.output.parent.mkdir(parents=True, exist_ok=True)
            run.output.write_text(titanmm_jsonl())
            return 0, "", 1.0
        return 0, peer_output() if run.side == "peer" else "built", 1.0

    monkeypatch.setattr(compare, "execute", fake_execute)
    monkeypatch.setattr(compare, "device_name", lambda: H200)
    monkeypatch.setattr(compare, "SFT_DATA_ROOT", tmp_path / "data")
    stats = compare.sft_data_dir(W) / "stats.json"
    stats.parent.mkdir(parents=True)
    stats.write_text(json.dumps({"lengths": {"samples": 2000, "mean_length": 753.7}}))
    args = ["--workload", NAME, "--steps", "8", "--warmup", "5", "--results-dir", str(tmp_path)]
    assert compare.main(args) == 0
    assert ran == ["setup", "titanmm", "peer"]
    (path,) = tmp_path.glob(f"*_h200x4_{NAME}.json")
    result = json.loads(path.read_text())
    assert result["gpus"] == 4 and result["ratio_of"] == "samples/s/GPU"
    assert result["ratio"] == pytest.approx(6.875 / 2.5)
    assert result["dataset"]["mean_length"] == 753.7 and result["settings"]["peer"]["samples_per_gpu"] == 2
    assert "peak reserved" in result["memory"] and "samples/s/GPU" in result["notes"]
    assert "6.88 samples/s/GPU" in capsys.readouterr().out
    row = readme_table.row(result)
    notes = row[readme_table.COLUMNS.index("notes")]
    assert "2.75x" in row and "samples/s/GPU 6.88 vs 2.50" in notes and "ratio of samples/s/GPU" in notes
    # compare.py wrote the targets: 2.75x at less peak memory than the peer's meets the 2x target
    assert result["targets"][0]["met"] is True and result["targets"][0]["measured"] == pytest.approx(2.75)
    assert row[readme_table.COLUMNS.index("issue-7 targets missed")] == "none"

    ran.clear()  # one side only: the data is still built first
    assert compare.main([*args, "--only", "titanmm"]) == 0
    assert ran == ["setup", "titanmm"]
    ran.clear()

    def failing_setup(run, log, deadline):
        ran.append(run.side)
        return (1, "disk full", 1.0) if run.side == "setup" else (0, "", 1.0)

    monkeypatch.setattr(compare, "execute", failing_setup)
    assert compare.main([*args, "--tag", "broken"]) == 1
    assert ran == ["setup"]  # neither side runs without the data
    (broken,) = tmp_path.glob(f"*_{NAME}_broken.json")
    result = json.loads(broken.read_text())
    assert "setup failed" in result["titanmm"]["error"] and "setup failed" in result["peer"]["error"]
    assert result["ratio"] is None
