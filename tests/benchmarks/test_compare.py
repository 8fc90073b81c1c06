"""benchmarks/compare.py and benchmarks/readme_table.py on CPU: the peers' log parsers, the summaries, the
commands of --dry-run and the README table, from small sample outputs (no GPU, no peer installed)."""

from __future__ import annotations

import json

import pytest

from tests.utils import load_benchmark


compare, readme_table = load_benchmark("compare"), load_benchmark("readme_table")

H100 = "NVIDIA H100 80GB HBM3"


def torchtitan_line(step, tps, mfu, memory=43.7, rank=0, color=False):
    c = {k: ("\033[%sm" % v if color else "") for k, v in
         dict(red="31", green="32", orange="38;2;180;60;0", turquoise="38;2;54;234;195", blue="34", cyan="36",
              magenta="35", reset="39").items()}
    return (f"[rank{rank}]:[titan] 2026-11-22 13:00:{step:02d},123 - root - INFO - "
            f"{c['red']}step: {step:2}  {c['green']}loss: {12.25 - step / 100:8.5f}  "
            f"{c['orange']}grad_norm: {1.5:7.4f}  {c['turquoise']}memory: {memory:5.2f}GiB(55.13%)  "
            f"{c['blue']}tps: {round(tps):,}  {c['cyan']}tflops: {tps * 16.8e9 / 1e12:,.2f}  "
            f"{c['magenta']}mfu: {mfu:.2f}%{c['reset']}")


TORCHTITAN_LOG = "\n".join([
    "[rank0]:[titan] 2026-11-22 13:00:00,000 - root - INFO - Starting job: Llama 3 8B proxy",
    "[rank0]:[titan] 2026-11-22 13:00:00,000 - root - INFO - Training starts at step 1",
    torchtitan_line(1, 2112, 3.6, memory=41.3, color=True),
    *[torchtitan_line(s, 29000 + 100 * s, 49.0 + s / 10, color=s % 2 == 0) for s in range(2, 9)],
    "[rank0]:[titan] 2026-11-22 13:00:09,000 - root - INFO - validate step:  5  loss: 9.1  memory: 50.00GiB(60%)  "
    "tps: 1,000",
    torchtitan_line(6, 1, 0.1, rank=1),  # another rank's line for a step rank 0 printed
    torchtitan_line(3, 99999, 99.0),  # the same step printed twice: the first line counts
])


def test_parse_torchtitan_log():
    records = compare.parse_torchtitan_log(TORCHTITAN_LOG)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert records[0] == {"step": 1, "loss": pytest.approx(12.24), "peak_mem_gib": 41.3, "tps_per_gpu": 2112,
                          "tflops_per_gpu": pytest.approx(2112 * 16.8e9 / 1e12, abs=0.01), "mfu": pytest.approx(0.036)}
    assert records[5]["tps_per_gpu"] == 29600 and records[5]["mfu"] == pytest.approx(0.496)
    assert records[2]["tps_per_gpu"] == 29300


def test_parse_torchtitan_log_without_rank_prefix_or_lines():
    plain = "step:  7  loss:  9.00000  grad_norm:  1.0000  memory: 43.70GiB(54.93%)  tps: 29,375  tflops: 495.12  " \
            "mfu: 50.06%"
    assert compare.parse_torchtitan_log(plain) == [{"step": 7, "loss": 9.0, "peak_mem_gib": 43.7, "tps_per_gpu": 29375,
                                                    "tflops_per_gpu": 495.12, "mfu": pytest.approx(0.5006)}]
    assert compare.parse_torchtitan_log("Traceback (most recent call last):\n  RuntimeError: boom") == []


def test_summarize_steps_drops_warmup_and_takes_the_median():
    summary = compare.summarize_steps(compare.parse_torchtitan_log(TORCHTITAN_LOG), warmup=5)
    assert summary["measured_steps"] == 3 and summary["steps"] == [6, 8]
    assert summary["tps_per_gpu"] == 29700 and summary["mfu"] == pytest.approx(0.497)
    assert summary["peak_mem_gib"] == 43.7
    with pytest.raises(ValueError, match="warm-up"):
        compare.summarize_steps(compare.parse_torchtitan_log(TORCHTITAN_LOG), warmup=8)


def titanmm_jsonl(steps=8, allocated=50.0):
    lines = [json.dumps({"step": s, "loss": 12.0, "tps_per_gpu": 2000.0 if s == 1 else 27000.0 + s,
                         "tflops_per_gpu": 450.0 + s, "mfu": 0.45, "peak_mem_gib": 65.8,
                         "peak_allocated_gib": allocated + s}) for s in range(1, steps + 1)]
    return "\n".join(lines + ['{"step": 9, "loss"'])  # a truncated last line is ignored


def test_summarize_lm_both_sides():
    w = compare.WORKLOADS["llama3_8b_proxy_bf16"]
    errors = {}
    sides, extra = compare.summarize(w, {"titanmm": titanmm_jsonl(), "peer": TORCHTITAN_LOG}, 5, H100, errors)
    assert errors == {} and extra == {}
    assert sides["titanmm"]["tps_per_gpu"] == 27007 and sides["titanmm"]["peak_mem_gib"] == 65.8
    assert sides["peer"]["tps_per_gpu"] == 29700
    # a side whose output holds no step is an error, the other side is kept
    sides, _ = compare.summarize(w, {"titanmm": titanmm_jsonl(), "peer": "OOM"}, 5, H100, errors)
    assert sides["peer"] is None and "peer" in errors and sides["titanmm"] is not None


HF_LLAVA = ("Loading...\nHF LLaVA pretrain-stage B=8 S=1024: 568.0 ms/step, 14.08 samples/s, 14,413 tok/s, "
            "peak 52.0 GiB\n")
HF_DECODE = {1: "HF generate llama3-8B default B=1: 25 new tok/s (5.12 s per call of 128 tokens)\n",
             32: "warning: something\n"
                 "HF generate llama3-8B default B=32: 845 new tok/s (4.85 s per call of 128 tokens)"}


def test_parse_hf_outputs():
    assert compare.parse_hf_llava(HF_LLAVA) == {"batch": 8, "seq_len": 1024, "ms_per_step": 568.0,
                                                "samples_per_s": 14.08, "tps_per_gpu": 14413, "peak_mem_gib": 52.0}
    assert compare.parse_hf_decode(HF_DECODE[32]) == {"model": "llama3-8B", "mode": "default", "batch": 32,
                                                      "new_tokens_per_s": 845, "seconds_per_call": 4.85,
                                                      "new_tokens": 128}
    assert compare.parse_hf_decode("HF generate llama3-8B static B=4: 1,234 new tok/s (0.41 s per call)")[
        "new_tokens_per_s"] == 1234
    assert compare.parse_hf_llava("CUDA out of memory") is None and compare.parse_hf_decode("") is None


def test_summarize_vlm_counts_the_same_flops_on_both_sides():
    w = compare.WORKLOADS["llava_mistral_clip336_pretrain"]
    errors = {}
    sides, extra = compare.summarize(w, {"titanmm": titanmm_jsonl(), "peer": HF_LLAVA}, 5, H100, errors)
    assert errors == {}
    t, p = sides["titanmm"], sides["peer"]
    assert t["samples_per_s"] == pytest.approx(27007 / 1024)
    assert t["peak_mem_gib"] == 58.0  # peak allocated, as the peer reports
    assert p["samples_per_s"] == 14.08 and p["peak_mem_gib"] == 52.0
    flops = compare.vlm_flops_per_token(1024)
    assert p["tflops_per_gpu"] == pytest.approx(flops * 14413 / 1e12)
    assert p["mfu"] == pytest.approx(flops * 14413 / 989.4e12)
    # The stage-1 step's own FLOPs (frozen LM: no weight gradients; vision tower forward only) at the H100's
    # measured matmul rate bound the samples/s any trainer reaches.
    stage1 = extra["stage1_flops_per_sample"]
    lm_only = compare.vlm_flops_per_token(1024) * 1024
    assert 0.6 * lm_only < stage1 < 0.75 * lm_only
    assert extra["ceiling_samples_per_s"] == pytest.approx(777e12 / stage1)


def test_summarize_decode_with_the_bandwidth_bound():
    w = compare.WORKLOADS["decode_llama3_8b"]
    params, weight_bytes = compare.decode_weight_stats()
    titanmm = {"hbm_copy_bytes_per_s": 3.0e12, "params_read": params, "weight_bytes": weight_bytes,
               "batches": {"1": {"new_tokens_per_s": 40.0, "seconds_per_call": 3.2, "peak_mem_gib": 15.5},
                           "32": {"new_tokens_per_s": 1200.0, "seconds_per_call": 3.4, "peak_mem_gib": 17.0,
                                  "roofline_tokens_per_s": 5500.0}}}
    outputs = {"titanmm": json.dumps(titanmm), "peer:1": HF_DECODE[1], "peer:32": HF_DECODE[32]}
    errors = {}
    sides, extra = compare.summarize(w, outputs, 0, H100, errors)
    assert errors == {}
    bound = 3.0e12 / weight_bytes
    assert extra["bandwidth_bound_tokens_per_s"] == pytest.approx(bound)
    assert sides["titanmm"]["tps_per_gpu"] == 40.0 and sides["peer"]["tps_per_gpu"] == 25
    assert sides["titanmm"]["bandwidth_bound_fraction"] == pytest.approx(40.0 / bound)
    assert sides["peer"]["by_batch"]["1"]["bandwidth_bound_fraction"] == pytest.approx(25 / bound)
    assert sides["titanmm"]["peak_mem_gib"] == 17.0
    assert extra["ratio_by_batch"] == {"1": pytest.approx(1.6), "32": pytest.approx(1200 / 845)}
    assert sides["titanmm"]["by_batch"]["32"]["tflops_per_gpu"] == pytest.approx(2 * params * 1200 / 1e12)
    assert sides["titanmm"]["by_batch"]["32"]["roofline_tokens_per_s"] == 5500.0  # the batch-32 target reads it
    result = {"workload": w.name, "device": H100, "gpus": 1, "date": "2026-11-22", "commit": "abc", "ratio": 1.6,
              "peer_name": "transformers", "titanmm": sides["titanmm"], "peer": sides["peer"], **extra}
    printed = compare.table(result)
    assert "titanmm B=32" in printed and "transformers B=1" in printed and "of the HBM bound" in printed


@pytest.mark.parametrize("workload", sorted(compare.WORKLOADS))
def test_dry_run_prints_both_sides(workload, capsys):
    assert compare.main(["--workload", workload, "--dry-run"]) == 0
    out = capsys.readouterr().out
    w = compare.WORKLOADS[workload]
    assert "# titanmm" in out and "# peer" in out
    if w.kind == "lm":
        titanmm_line = next(line for line in out.splitlines() if "titanmm.train" in line)
        peer_line = next(line for line in out.splitlines() if "launch.py" in line)
        assert f"--nproc_per_node={w.gpus}" in titanmm_line and f"--nproc_per_node={w.gpus}" in peer_line
        assert "--training.seq_len=8192" in titanmm_line and "--training.seq_len 8192" in peer_line
        assert "--compile.enable=true" in titanmm_line and "--activation_checkpoint.mode=selective" in titanmm_line
        assert f"TT_LAYERS={w.layers}" in peer_line
        assert ("--model.n_layers=8" in titanmm_line) == (w.layers == 8)
        assert ("--float8.enable=true" in titanmm_line) == w.fp8
        assert ("quantize.linear.float8" in peer_line) == w.fp8
        assert "--metrics.log_freq 1" in peer_line and "--training.steps 15" in peer_line
    elif w.kind == "vlm":
        assert "--training.local_batch_size=8" in out and "--training.dataset=mock" in out
        assert "bench_hf.py llava 8" in out
    elif w.kind == "vlm_sft":  # details in test_compare_sft.py
        assert "# setup" in out and "hf_llava_sft.py" in out
    elif w.decode_model == "vlm":  # details in test_hf_llava_decode.py
        assert "decode_throughput.py --model vlm --flavor llava_mistral_7b_clip336 --batch 1 32" in out
        assert "hf_llava_decode.py --batch 1 " in out and "hf_llava_decode.py --batch 32 " in out
        assert "bench_hf.py" not in out
    else:
        assert "decode_throughput.py --flavor llama3_8b --batch 1 32" in out
        assert "bench_hf.py decode default 1" in out and "bench_hf.py decode default 32" in out


def test_dry_run_gpus_and_argument_checks(capsys):
    assert compare.main(["--workload", "llama3_8b_bf16", "--gpus", "8", "--steps", "12", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("--nproc_per_node=8") == 2 and "--training.steps=12" in out
    with pytest.raises(SystemExit):
        compare.main(["--workload", "decode_llama3_8b", "--gpus", "2", "--dry-run"])
    with pytest.raises(SystemExit):
        compare.main(["--workload", "llama3_8b_proxy_bf16", "--steps", "5", "--warmup", "5", "--dry-run"])


def test_dry_run_side_environments(capsys):
    """--titanmm-env / --peer-env reach one side's processes only, in their recorded commands."""
    assert compare.main(["--workload", "llama3_8b_bf16", "--gpus", "2", "--dry-run", "--titanmm-env=NCCL_PROTO=Simple",
                         "--peer-env", "NCCL_MAX_NCHANNELS=8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    titanmm = lines[lines.index("# titanmm: titanmm") + 1]
    peer = next(line for line in lines if line.startswith("TT_LAYERS="))
    assert "NCCL_PROTO=Simple " in titanmm and "NCCL_MAX_NCHANNELS" not in titanmm
    assert "NCCL_MAX_NCHANNELS=8 " in peer and "NCCL_PROTO" not in peer
    with pytest.raises(SystemExit):
        compare.main(["--workload", "llama3_8b_bf16", "--dry-run", "--titanmm-env=NCCL_PROTO"])


def result_file(tmp_path, name, **fields):
    base = {"workload": "llama3_8b_proxy_bf16", "device": H100, "gpus": 1, "date": "2026-11-22", "commit": "f47c52d",
            "peer_name": "torchtitan 0.2.2", "memory": "peak reserved (caching allocator)", "ratio": 0.9,
            "titanmm": {"tps_per_gpu": 26500.0, "tflops_per_gpu": 446.0, "mfu": 0.451, "peak_mem_gib": 65.8},
            "peer": {"tps_per_gpu": 29375.0, "tflops_per_gpu": 495.0, "mfu": 0.5, "peak_mem_gib": 43.7}}
    base.update(fields)
    (tmp_path / name).write_text(json.dumps(base))


def test_readme_table(tmp_path):
    result_file(tmp_path, "2026-11-20_h100_llama3_8b_proxy_bf16.json", date="2026-11-20", ratio=0.5)  # older
    result_file(tmp_path, "2026-11-22_h100_llama3_8b_proxy_bf16.json")
    result_file(tmp_path, "2026-11-22_h100_decode_llama3_8b.json", workload="decode_llama3_8b", ratio=1.6,
                peer_name="transformers", memory="peak allocated", hbm_copy_gb_per_s=2950.0,
                ratio_by_batch={"1": 1.6, "32": 1.42},
                titanmm={"tps_per_gpu": 40.0, "mfu": 0.0006, "peak_mem_gib": 17.0, "bandwidth_bound_fraction": 0.2,
                         "by_batch": {"1": {"tps_per_gpu": 40.0}, "32": {"tps_per_gpu": 1200.0}}},
                peer={"tps_per_gpu": 25.0, "mfu": 0.0004, "peak_mem_gib": None, "bandwidth_bound_fraction": 0.125,
                      "by_batch": {"1": {"tps_per_gpu": 25.0}, "32": {"tps_per_gpu": 845.0}}})
    result_file(tmp_path, "2026-11-22_h100_llama3_8b_proxy_fp8.json", workload="llama3_8b_proxy_fp8",
                peer={"tps_per_gpu": None, "error": "exit 1"})  # failed peer: no row
    (tmp_path / "2026-11-22_h100_llama3_8b_8layers_bf16.json").write_text(json.dumps({"titanmm": {}}))  # no peer
    (tmp_path / "broken.json").write_text("{")
    results = readme_table.load_results(tmp_path)
    assert [(r["workload"], r["date"]) for r in results] == [("llama3_8b_proxy_bf16", "2026-11-22"),
                                                             ("decode_llama3_8b", "2026-11-22")]
    block = readme_table.render(results)
    lines = block.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| workload |")
    assert "| `llama3_8b_proxy_bf16` | 1 x H100 80GB HBM3 | 26,500 | torchtitan 0.2.2 | 29,375 | 0.90x |" in lines[2]
    assert "45.1% / 50.0%" in lines[2] and "65.8 / 43.7 GiB" in lines[2] and "2026-11-22 f47c52d" in lines[2]
    assert "batch 1 at 20.0% / 12.5% of the memory-bandwidth bound (2,950 GB/s copy)" in lines[3]
    assert "batch 32: 1,200 vs 845 new tokens/s (1.42x)" in lines[3] and "memory: peak allocated" in lines[3]

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n## Performance\nbefore\n{readme_table.START}\nold\n{readme_table.END}\nafter\n")
    args = ["--readme", str(readme), "--results", str(tmp_path)]
    assert readme_table.main([*args, "--check"]) == 1
    assert readme_table.main(args) == 0
    text = readme.read_text()
    assert text.startswith("# x\n## Performance\nbefore\n") and text.endswith(f"{readme_table.END}\nafter\n")
    assert block in text and "old" not in text
    assert readme_table.main([*args, "--check"]) == 0
    assert readme_table.replace_table(text, block) == text


def test_readme_table_needs_the_markers():
    with pytest.raises(ValueError, match="perf-table"):
        readme_table.replace_table("## Performance\nno markers\n", "x")
    assert "No side-by-side results yet" in readme_table.render([])


def test_log_freq_reaches_both_sides_and_windows_start_after_warmup(tmp_path):
    w = compare.WORKLOADS["llama3_8b_proxy_bf16"]
    runs = compare.plan(w, 1, 40, tmp_path, log_freq=10)
    titanmm = next(r for r in runs if r.side == "titanmm").argv
    peer = next(r for r in runs if r.side == "peer").argv
    assert "--metrics.log_freq=10" in titanmm and peer[peer.index("--metrics.log_freq") + 1] == "10"
    records = [{"step": s, "tps_per_gpu": float(s), "tflops_per_gpu": 1.0, "mfu": 0.5, "peak_mem_gib": 1.0}
               for s in (1, 10, 20, 30, 40)]
    summary = compare.summarize_steps(records, warmup=5, log_freq=10)
    assert summary["steps"] == [20, 40] and summary["tps_per_gpu"] == 30.0  # steps 11-20, 21-30, 31-40
