#!/usr/bin/env bash
# One device call: titanmm and its peers side by side (benchmarks/compare.py) on the machine's GPUs, one workload
# after the other; each writes its results JSON under $OUT, and every process's full output goes to $OUT/compare.log.
#   bash benchmarks/device_compare.sh [WORKLOAD ...]
# Default: the one-GPU workloads (llama3_8b_proxy_bf16, llama3_8b_proxy_fp8, llava_mistral_clip336_pretrain,
# decode_llama3_8b), about 8 minutes on one H100. On 4 GPUs: bash benchmarks/device_compare.sh llama3_8b_bf16 llama3_8b_fp8
# or bash benchmarks/device_compare.sh llava_mistral_clip336_sft (it first builds its synthetic SFT set under /tmp).
# Before the call, on the development machine: bash benchmarks/setup_peers.sh, and carry .peers and .device-wheels.
# Environment: BUDGET (seconds for the whole call, default 530: a workload that would start with less than
# MIN_LEFT=90 seconds left is skipped, and a run still going at the end is stopped), STEPS (15), WARMUP (5),
# LOG_FREQ (1: both sides log, and so wait for the GPU, at every step), GPUS (default: each workload's own count;
# e.g. GPUS=2 runs the four-GPU workloads on a two-GPU machine).
set -uo pipefail
start=$SECONDS
source benchmarks/device_peer_env.sh
log=$OUT/compare.log
BUDGET=${BUDGET:-530}; MIN_LEFT=${MIN_LEFT:-90}
[ -f .peers/torchtitan/launch.py ] || { echo "no .peers/: run benchmarks/setup_peers.sh and carry .peers" | tee -a "$log"; exit 2; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, torchao, torchtitan, transformers; print('torch', torch.__version__, '| torchao', torchao.__version__, '| torchtitan', torchtitan.__version__, '| transformers', transformers.__version__)" 2>&1 | tail -1
} | tee -a "$log"
workloads=("$@")
[ ${#workloads[@]} -gt 0 ] || workloads=(llama3_8b_proxy_bf16 llama3_8b_proxy_fp8 llava_mistral_clip336_pretrain decode_llama3_8b)
for workload in "${workloads[@]}"; do
  left=$((BUDGET - (SECONDS - start)))
  if [ "$left" -lt "$MIN_LEFT" ]; then
    echo "=== $workload skipped: ${left} s of the ${BUDGET} s budget left" | tee -a "$log"; continue
  fi
  echo "=== $workload (${left} s left)"
  python3 benchmarks/compare.py --workload "$workload" --steps "${STEPS:-15}" --warmup "${WARMUP:-5}" \
      --log-freq "${LOG_FREQ:-1}" ${GPUS:+--gpus "$GPUS"} \
      --results-dir "$OUT" --log "$log" --time-limit "$left" 2>&1 | tail -n 14
done
echo "=== done in $((SECONDS - start)) s; results in $OUT"
