"""[profiling]: the kernel breakdown and memory peak summary on synthetic inputs, traces of a short CPU training
run, and the config checks.

(No tests/utils/__init__.py: it would make this folder the `tests.utils` package and hide tests/utils.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from titanmm.config import load_config
from titanmm.config.loader import ConfigError
from titanmm.utils.profiling import busy_time_us, kernel_breakdown, kernel_category, live_blocks_at_peak, \
    memory_peak_summary

REPO = Path(__file__).resolve().parents[2]
DEBUG_CONFIG = str(REPO / "train_configs" / "debug_llama.toml")
_GIB = 1024**3


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNN", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", "attention"),
    ("triton_tem_fused_flex_attention_0", "attention"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "triton fused"),
    ("Memcpy HtoD (Pageable -> Device)", "copies/casts"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda>", "copies/casts"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "optimizer"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<2>, CopyFunctor<c10::BFloat16, float>>",
     "copies/casts"),  # FSDP2's foreach copy-in with the bf16 cast
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<1>, LpNormFunctor<float>>", "optimizer"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps>>", "other"),
    ("autograd::engine::evaluate_function: MmBackward0", "matmul"),  # CPU operator names
    ("aten::linear", "matmul"),
])
def test_kernel_categories(name, category):
    assert kernel_category(name) == category


def test_busy_time_counts_overlaps_once():
    # [0, 10) and [5, 20) overlap into [0, 20); [8, 12) lies inside; [30, 35) is apart: 25 us busy.
    assert busy_time_us([(0, 10), (5, 15), (8, 4), (30, 5)]) == 25
    assert busy_time_us([]) == 0


def _table_row(text: str, label: str) -> list[str]:
    """The row of `label` in the category table (which follows the "category" header line)."""
    table = text.split("\ncategory ")[1].split("\n\n")[0]
    return next(line for line in table.splitlines() if line.startswith(label + " ")).split()


def test_kernel_breakdown_categories_idle_and_top_kernels():
    events = [("sm90_xmma_gemm_bf16", 0, 4000), ("sm90_xmma_gemm_bf16", 5000, 4000),  # 8 ms matmul
              ("ncclDevKernel_AllGather_RING_LL", 2000, 6000),  # 6 ms, overlapping the gemms on another stream
              ("flash_fwd_kernel", 9000, 1000),
              ("Memcpy HtoD (Pageable -> Device)", 10000, 500)]
    events += [(f"kernel_{i:02d}_" + "x" * 150, 11000 + 10 * i, 10 - i * 0.1) for i in range(40)]
    text = kernel_breakdown(events, wall_us=20000, title="rank 0, step 2")
    assert text.startswith("rank 0, step 2\nsource: CUDA kernels")
    total = 8000 + 6000 + 1000 + 500 + sum(10 - i * 0.1 for i in range(40))
    assert _table_row(text, "matmul")[1:3] == ["8.00", f"{100 * 8000 / total:.1f}%"]
    assert _table_row(text, "communication")[1] == "6.00"
    assert _table_row(text, "attention")[1] == "1.00"
    assert _table_row(text, "copies/casts")[1] == "0.50"
    # Busy: [0, 10500) plus the 40 short kernels (each inside its own 10 us slot); idle is the rest of 20 ms.
    busy = 10500 + sum(10 - i * 0.1 for i in range(40))
    assert _table_row(text, "idle")[1:3] == [f"{(20000 - busy) / 1e3:.2f}", f"{100 * (20000 - busy) / 20000:.1f}%"]
    # The all-gather runs alone between the two gemms, [4000, 5000): 1 ms exposed.
    exposed = next(line for line in text.splitlines() if line.startswith("exposed comm"))
    assert exposed.split()[2:4] == ["1.00", "ms"] and exposed.split()[4] == f"{100 * 1000 / 20000:.1f}%"
    top = text.split("by total time\n")[1].splitlines()[1:]
    assert len(top) == 30
    assert top[0].split()[-1] == "sm90_xmma_gemm_bf16" and top[0].split()[2] == "2"  # two calls, summed
    assert top[1].split()[-1].startswith("ncclDevKernel")
    assert max(len(line.split()[-1]) for line in top) == 120  # names cut at 120 characters
    assert "x" * 121 not in text


def test_kernel_breakdown_on_cpu_says_so():
    text = kernel_breakdown([("aten::linear", 0, 50), ("aten::add", 60, 10)], wall_us=100, on_device=False)
    assert "CPU operator time" in text.splitlines()[1] and "exposed comm" not in text
    assert _table_row(text, "idle")[1:3] == ["0.04", "40.0%"]


def _frame(filename, line, name):
    return {"filename": filename, "line": line, "name": name}


TORCH_FRAME = _frame("/usr/lib/python3.11/site-packages/torch/nn/modules/linear.py", 125, "forward")


def test_memory_peak_is_replayed_from_the_history():
    """Alive now: the weights (6 GiB), a gradient (2 GiB, no stack) and a buffer (1 GiB). The history: activations
    a1, a2 (4 GiB each, from attention.py), the gradient, a1 and a2 freed, the buffer; the peak (16 GiB) came
    before the frees, with the weights, a1, a2 and the gradient alive."""
    weights = [TORCH_FRAME, _frame("/work/titanmm/models/llama.py", 40, "init_weights")]
    acts = [TORCH_FRAME, _frame("/work/titanmm/models/attention.py", 88, "forward"),
            _frame("/work/titanmm/train.py", 250, "_forward_loss_sum")]
    snapshot = {
        "segments": [{"device": 0, "address": 0, "blocks": [
            {"address": 0, "size": 6 * _GIB, "requested_size": 6 * _GIB, "state": "active_allocated",
             "frames": weights},
            {"address": 8 * _GIB, "size": 2 * _GIB, "requested_size": 2 * _GIB, "state": "active_allocated",
             "frames": []},
            {"address": 10 * _GIB, "size": 1 * _GIB, "requested_size": 1 * _GIB, "state": "active_allocated",
             "frames": []},
            {"address": 11 * _GIB, "size": 8 * _GIB, "requested_size": 8 * _GIB, "state": "inactive", "frames": []},
        ]}],
        "device_traces": [[
            {"action": "alloc", "addr": 11 * _GIB, "size": 4 * _GIB, "frames": acts},
            {"action": "alloc", "addr": 15 * _GIB, "size": 4 * _GIB, "frames": acts},
            {"action": "alloc", "addr": 8 * _GIB, "size": 2 * _GIB, "frames": []},
            {"action": "free_requested", "addr": 11 * _GIB, "size": 4 * _GIB, "frames": acts},
            {"action": "free_completed", "addr": 11 * _GIB, "size": 4 * _GIB, "frames": []},
            {"action": "free_completed", "addr": 15 * _GIB, "size": 4 * _GIB, "frames": []},
            {"action": "alloc", "addr": 10 * _GIB, "size": 1 * _GIB, "frames": []},
        ]],
    }
    blocks, peak, n_events = live_blocks_at_peak(snapshot)
    assert peak == 16 * _GIB and n_events == 6
    assert sorted(b["size"] // _GIB for b in blocks) == [2, 4, 4, 6]
    stats = {"allocated_bytes.all.peak": 16 * _GIB, "requested_bytes.all.peak": 16 * _GIB,
             "reserved_bytes.all.peak": 19 * _GIB, "num_alloc_retries": 3}
    text = memory_peak_summary(snapshot, stats, title="rank 0, iteration_10")
    assert "16.00 GiB requested in 4 allocations" in text and "allocator retries 3" in text
    assert "before the recorded history" not in text
    first, second = text.split("\n  1.")[1], text.split("\n  2.")[1]
    assert first.split("\n")[0].split() == ["8.00", "GiB", "in", "2", "allocations,", "largest", "4096.0", "MiB"]
    assert "titanmm/models/attention.py:88 forward" in first and "torch/" not in first.split("\n  2.")[0]
    assert "titanmm/models/llama.py:40 init_weights" in second
    assert "no Python stack" in text.split("\n  3.")[1]


def test_memory_peak_before_the_history_is_flagged():
    snapshot = {"segments": [], "device_traces": [[{"action": "oom", "size": _GIB, "device_free": 0}]]}
    text = memory_peak_summary(snapshot, {"requested_bytes.all.peak": 5 * _GIB})
    assert "raise profiling.snapshot_max_entries" in text
    assert "an allocation of 1.00 GiB failed" in text


def test_resumed_session_windows_end_at_multiples_of_profile_freq(tmp_path):
    """A loop resumed after step 3: windows of 2 recorded steps end at steps 4 and 6, the training steps."""
    import torch

    from titanmm.config.job_config import Profiling
    from titanmm.utils.profiling import Profiler

    config = Profiling(enable_profiling=True, profile_freq=2, profiler_warmup=0, profiler_active=2)
    x = torch.randn(16, 16)
    with Profiler(config, tmp_path, rank=0, device=torch.device("cpu")).session(step=3) as profiler:
        for step in range(4, 7):
            x = (x @ x).tanh()
            profiler.step(step)
    folders = sorted((tmp_path / "profile_traces").iterdir())
    assert [f.name for f in folders] == ["iteration_4", "iteration_6"]  # step 4 ends the window it began in
    assert (folders[0] / "rank0_kernels.txt").read_text().startswith("rank 0, step 4 (1 profiled step)")
    assert (folders[1] / "rank0_kernels.txt").read_text().startswith("rank 0, steps 5-6 (2 profiled steps)")
    assert float(_table_row((folders[1] / "rank0_kernels.txt").read_text(), "matmul")[1]) > 0


def test_training_writes_traces_at_every_profile_freq(tmp_path, in_process, caplog):
    from titanmm.train import Trainer

    config = load_config(DEBUG_CONFIG, [
        f"--job.dump_folder={tmp_path}", "--training.steps=5", "--training.seq_len=32",
        "--training.local_batch_size=2", "--training.dataset=mock", "--metrics.enable_tensorboard=false",
        "--metrics.plot_loss=false", "--profiling.enable_profiling=true", "--profiling.profile_freq=2",
        "--profiling.profiler_warmup=0", "--profiling.profiler_active=1",
        "--profiling.enable_memory_snapshot=true"])
    with caplog.at_level("INFO", logger="titanmm"):
        Trainer(config).train()
    traces = tmp_path / "profile_traces"
    # Steps 2 and 4 end windows; step 5 starts one that the end of training cuts short: not written.
    assert sorted(p.name for p in traces.iterdir()) == ["iteration_2", "iteration_4"]
    for step in (2, 4):
        folder = traces / f"iteration_{step}"
        assert sorted(p.name for p in folder.iterdir()) == ["rank0_kernels.txt", "rank0_trace.json"]
        assert '"traceEvents"' in (folder / "rank0_trace.json").read_text()
        kernels = (folder / "rank0_kernels.txt").read_text()
        assert kernels.startswith(f"rank 0, step {step} ") and "CPU operator time" in kernels
        assert float(_table_row(kernels, "matmul")[1]) > 0
    assert f"written to {traces / 'iteration_2'}" in caplog.text
    assert "memory snapshots need CUDA" in caplog.text and not (tmp_path / "memory_snapshot").exists()


def test_profiling_off_writes_nothing(tmp_path, in_process):
    from titanmm.train import Trainer

    config = load_config(DEBUG_CONFIG, [
        f"--job.dump_folder={tmp_path}", "--training.steps=2", "--training.seq_len=32",
        "--training.local_batch_size=2", "--training.dataset=mock", "--metrics.enable_tensorboard=false",
        "--metrics.plot_loss=false", "--profiling.profile_freq=1"])
    trainer = Trainer(config)
    trainer.train()
    assert trainer.profiler._torch_profiler is None and not trainer.profiler._recording_memory
    assert not (tmp_path / "profile_traces").exists() and not (tmp_path / "memory_snapshot").exists()


@pytest.mark.parametrize("overrides, message", [
    (["--profiling.enable_profiling=true", "--profiling.profile_freq=3", "--profiling.profiler_warmup=3"],
     "profiling.profiler_warmup + profiling.profiler_active = 4 exceeds profiling.profile_freq = 3"),
    (["--profiling.profile_freq=0"], "profiling.profile_freq = 0 must be > 0"),
    (["--profiling.profiler_warmup=-1"], "profiling.profiler_warmup = -1 must be >= 0"),
    (["--profiling.snapshot_max_entries=0"], "profiling.snapshot_max_entries = 0 must be > 0"),
])
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        load_config(DEBUG_CONFIG, overrides)


def test_memory_snapshots_alone_may_use_any_profile_freq():
    config = load_config(DEBUG_CONFIG, ["--profiling.enable_memory_snapshot=true", "--profiling.profile_freq=1"])
    assert config.profiling.profile_freq == 1


def test_top_kernel_names_drop_arguments_and_namespace_noise():
    from titanmm.utils.profiling import _shortened

    name = ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
            "TensorListMetadata<2>, at::native::(anonymous namespace)::CopyFunctor<c10::BFloat16, float, 2, 1, 1>, "
            "at::native::Identity<float>>(at::native::(anonymous namespace)::TensorListMetadata<2>, int)")
    assert _shortened(name) == ("void multi_tensor_apply_kernel<TensorListMetadata<2>, CopyFunctor<c10::BFloat16, "
                                "float, 2, 1, 1>, Identity<float>>")
