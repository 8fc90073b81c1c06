"""benchmarks/targets.py: issue 7's targets evaluated on compare.py results files (met, shortfall, the FP8 run's
bf16 twin, the recorded kernel breakdowns), the in-place update with --check, and the README table's column."""

import json

from tests.utils import load_benchmark

targets = load_benchmark("targets")
readme_table = load_benchmark("readme_table")


def _lm(workload="llama3_8b_bf16", tps=8761.0, ratio=1.01, mfu=0.513, mem=81.13, peer_mem=80.97, variant=None,
        date="2026-11-23"):
    return {"workload": workload, "device": "NVIDIA H200", "gpus": 2, "date": date, "commit": "e9fc743",
            "peer_name": "torchtitan 0.2.2", "variant": variant, "ratio": ratio,
            "titanmm": {"tps_per_gpu": tps, "mfu": mfu, "peak_mem_gib": mem},
            "peer": {"tps_per_gpu": tps / ratio, "mfu": mfu / ratio, "peak_mem_gib": peer_mem}}


def test_language_model_targets():
    entries = targets.evaluate(_lm())
    assert [e["target"] for e in entries] == ["tokens/s >= 1.10x torchtitan 0.2.2",
                                              "peak memory <= torchtitan 0.2.2's (GiB)", "bf16 MFU >= 55%"]
    speed, memory, mfu = entries
    assert speed["met"] is False and speed["shortfall"] == "8.9% more needed" and speed["required"] == 1.10
    assert memory["met"] is False and memory["shortfall"] == "0.16 GiB over"
    assert mfu["met"] is False and mfu["measured"] == 0.513
    # The peer prints its memory to 0.01 GiB: a titanmm peak within that rounding counts as equal.
    assert targets.evaluate(_lm(mem=80.974))[1]["met"] is True
    met = targets.evaluate(_lm(ratio=1.12, mfu=0.56, mem=80.0))
    assert all(e["met"] and e["shortfall"] is None for e in met)


def test_fp8_is_measured_against_the_bf16_twin(tmp_path):
    fp8 = _lm("llama3_8b_fp8", tps=10956.0, ratio=0.999, mfu=0.641)
    entry = targets.evaluate(fp8, tmp_path)[-1]
    assert entry["target"] == "FP8 tokens/s >= 1.4x titanmm bf16" and entry["shortfall"] == "not measured"
    (tmp_path / "2026-11-22_h200x2_llama3_8b_bf16.json").write_text(json.dumps(_lm(tps=9000.0, date="2026-11-22")))
    (tmp_path / "2026-11-23_h200x2_llama3_8b_bf16.json").write_text(json.dumps(_lm(tps=8761.0)))
    (tmp_path / "2026-11-23_h200x2_llama3_8b_bf16_log10.json").write_text(json.dumps(_lm(tps=8000.0, variant="log10")))
    (tmp_path / "2026-11-24_h100_llama3_8b_bf16.json").write_text(json.dumps({**_lm(tps=1.0), "gpus": 1}))
    entry = targets.evaluate(fp8, tmp_path)[-1]
    assert entry["source"] == "2026-11-23_h200x2_llama3_8b_bf16.json"  # newest of the same variant
    assert abs(entry["measured"] - 10956.0 / 8761.0) < 1e-12 and entry["met"] is False
    assert entry["shortfall"] == "12.0% more needed"
    log10 = targets.evaluate({**fp8, "variant": "log10"}, tmp_path)[-1]
    assert log10["source"] == "2026-11-23_h200x2_llama3_8b_bf16_log10.json"
    # A bf16 run made after the FP8 one is not its twin while one from before exists.
    (tmp_path / "2026-12-07_h200x2_llama3_8b_bf16_log10.json").write_text(
        json.dumps(_lm(tps=9500.0, variant="log10", date="2026-12-07")))
    assert targets.evaluate({**fp8, "variant": "log10"}, tmp_path)[-1]["source"] == log10["source"]


def test_vision_language_and_decoding_targets():
    sft = {"workload": "llava_mistral_clip336_sft", "device": "NVIDIA H200", "gpus": 2, "peer_name": "transformers",
           "ratio": 3.84, "titanmm": {"peak_mem_gib": 75.1, "packing_efficiency": 0.97, "data_wait_pct": 0.12},
           "peer": {"peak_mem_gib": 72.3}}
    speed, packing, loader = targets.evaluate(sft)
    assert speed["met"] is False and speed["shortfall"] == "3.84x, but at 75.1 GiB against 72.3"
    assert packing["met"] and loader["met"]
    assert targets.evaluate({**sft, "titanmm": {**sft["titanmm"], "peak_mem_gib": 64.0}})[0]["met"] is True
    pretrain = {"workload": "llava_mistral_clip336_pretrain", "device": "NVIDIA H100 80GB HBM3", "gpus": 1,
                "peer_name": "transformers", "ratio": 1.38, "ceiling_samples_per_s": 24.9,
                "titanmm": {"peak_mem_gib": 39.5, "samples_per_s": 19.15}, "peer": {"peak_mem_gib": 52.0,
                                                                                   "samples_per_s": 13.85}}
    (speed,) = targets.evaluate(pretrain)
    assert speed["attainable"] is False and speed["required_rate"] == 27.7
    assert speed["shortfall"] == ("44.9% more needed; that is 27.7 samples/s, 11.2% above the step's FLOPs at the "
                                  "measured matmul rate (24.9): unattainable against this run")
    decode = {"workload": "decode_llava_mistral_clip336", "device": "NVIDIA H100 80GB HBM3", "gpus": 1,
              "peer_name": "transformers", "ratio_by_batch": {"1": 3.7, "32": 2.12},
              "titanmm": {"bandwidth_bound_fraction": 0.756}, "peer": {}}
    batch1, batch32 = targets.evaluate(decode)
    assert batch1["met"] and batch32["met"] is False and batch32["shortfall"] == "88.7% more needed"
    # With the call's roofline on titanmm's side: is 4x the peer's batch-32 rate attainable at all?
    by_batch = {"titanmm": {"by_batch": {"32": {"tps_per_gpu": 4081.7, "roofline_tokens_per_s": 5420.0}}},
                "peer": {"by_batch": {"32": {"tps_per_gpu": 1390.0}}}}
    above = targets.evaluate({**decode, **by_batch, "ratio_by_batch": {"32": 4081.7 / 1390.0}})[1]
    assert above["attainable"] is False and above["required_rate"] == 5560.0
    assert above["shortfall"] == ("36.2% more needed; that is 5,560 new tokens/s, 2.6% above the call's roofline "
                                  "(5,420): unattainable against this run")
    by_batch["peer"]["by_batch"]["32"]["tps_per_gpu"] = 1048.0
    below = targets.evaluate({**decode, **by_batch, "ratio_by_batch": {"32": 4081.7 / 1048.0}})[1]
    assert below["attainable"] is True and below["shortfall"] == "2.7% more needed"


def test_update_in_place_profiles_and_readme_column(tmp_path):
    path = tmp_path / "2026-11-23_h200x2_llama3_8b_bf16.json"
    path.write_text(json.dumps(_lm()))
    (tmp_path / "2026-11-23_h200x2_llama3_8b_bf16_titanmm_rank0_kernels.txt").write_text("breakdown")
    (tmp_path / "2026-11-23_h200x2_llama3_8b_fp8_titanmm_rank0_kernels.txt").write_text("another workload")
    (tmp_path / "notes.json").write_text(json.dumps({"titanmm": {}}))  # not a compare.py file: left alone
    args = ["--results", str(tmp_path)]
    assert targets.main([*args, "--check"]) == 1
    assert targets.main(args) == 0 and targets.main([*args, "--check"]) == 0
    result = json.loads(path.read_text())
    assert result["profiles"] == ["2026-11-23_h200x2_llama3_8b_bf16_titanmm_rank0_kernels.txt"]
    assert len(result["targets"]) == 3 and json.loads((tmp_path / "notes.json").read_text()) == {"titanmm": {}}
    missed = readme_table.missed_targets(result)
    assert missed.startswith("tokens/s >= 1.10x torchtitan 0.2.2: 8.9% more needed; peak memory")
    assert readme_table.missed_targets({**result, "targets": [result["targets"][0] | {"met": True}]}) == "none"
    assert readme_table.missed_targets(_lm()) == ""
    assert "  target bf16 MFU >= 55%: 0.513 (required 0.55) missed: 7.2% more needed" in targets.summary(result)


def test_repository_results_and_readme_table_are_current():
    """benchmarks/results carries its targets, and the README's table shows them (python benchmarks/targets.py,
    then python benchmarks/readme_table.py, after adding a results file)."""
    assert targets.main(["--check"]) == 0
    assert readme_table.main(["--check"]) == 0
