#!/usr/bin/env bash
# One device call on 2 GPUs (nvidia-h200-x2): FP8 / context-parallel / async-TP GPU tests, or throughput.
#   bash benchmarks/device_parallel.sh tests [pytest -k expression]
#   bash benchmarks/device_parallel.sh bench
# Needs the wheels in .device-wheels (../shared/device/wheels.sh .device-wheels megatron-energon torchao==0.18.0).
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TITANMM_COMMIT=${TITANMM_COMMIT:-unknown}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --find-links .device-wheels torchao 2>&1 | grep -v WARNING | tail -2
python3 -m pip install -q --no-index --find-links .device-wheels megatron-energon 2>&1 | grep -v WARNING | tail -2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)"
what=${1:-tests}
if [ "$what" = tests ]; then
  python3 -m pytest -m gpu tests/gpu/test_gpu_float8.py tests/gpu/test_gpu_context_parallel.py \
      tests/gpu/test_gpu_async_tp.py -q -rA -s -p no:cacheprovider ${2:+-k "$2"} 2>&1 | tee "$OUT/gpu_tests_parallel.log" \
      | grep -E "passed|failed|PASSED|FAILED|Error|float8 |assert" | tail -40
  exit 0
fi
bench() {  # name nproc flags...
  local name=$1 nproc=$2; shift 2
  python3 benchmarks/train_throughput.py --workload "$name" --nproc "$nproc" --warmup 5 --results-dir "$OUT" -- \
      --config train_configs/llama3_8b.toml --training.steps=20 --training.seq_len=8192 "$@" 2>&1 \
      | tee "$OUT/bench_${name}.log" | grep -E "tps_per_gpu|mfu|peak_mem|Error|error" | tail -8
}
# One GPU: Llama 3 8B widths, 8 blocks, seq 8192, batch 1, compiled, selective AC: bf16 vs FP8 recipes.
bench llama3_8b_8layers_bf16_compile_sac 1 --model.n_layers=8 --training.local_batch_size=1
bench llama3_8b_8layers_fp8_tensorwise_compile_sac 1 --model.n_layers=8 --training.local_batch_size=1 --float8.enable=true
# Two GPUs: TP 2 with and without async TP (8 blocks, batch 2), and CP 2 (batch 1 sequence of 16384 split in two).
bench llama3_8b_8layers_bf16_tp2 2 --model.n_layers=8 --training.local_batch_size=2 --parallelism.tensor_parallel_degree=2
bench llama3_8b_8layers_bf16_tp2_async 2 --model.n_layers=8 --training.local_batch_size=2 --parallelism.tensor_parallel_degree=2 --compile.enable_async_tensor_parallel=true
bench llama3_8b_8layers_bf16_cp2_seq16k 2 --model.n_layers=8 --training.local_batch_size=1 --model.flavor=llama3.1_8b --training.seq_len=16384 --training.document_masking=false --parallelism.context_parallel_degree=2
