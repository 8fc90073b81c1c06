#!/usr/bin/env bash
# One device call of experiments behind the issue-7 optimisation work (one H100): the attention backends at
# Llama 3 8B's shape, and variants of the compare.py workloads (titanmm and/or the peer with one setting
# changed). Results JSONs (tagged by variant) and the full log go to $OUT.
#   bash benchmarks/device_probe.sh            (needs .peers and .device-wheels carried, as device_compare.sh)
set -uo pipefail
start=$SECONDS
source benchmarks/device_peer_env.sh
log=$OUT/probe.log
BUDGET=${BUDGET:-560}
left() { echo $((BUDGET - (SECONDS - start))); }
compare() {  # compare.py with the remaining budget; prints the table
  local l; l=$(left)
  [ "$l" -gt 60 ] || { echo "=== skipped (budget): $*"; return; }
  echo "=== $* (${l} s left)"
  python3 benchmarks/compare.py --steps 12 --warmup 4 --results-dir "$OUT" --log "$log" --time-limit "$l" "$@" 2>&1 \
      | tail -n 8
}
profile() {  # titanmm's 8B proxy (bf16 unless told) with the profiler and memory snapshots at step 10
  local dump=/tmp/probe_profile_$1; shift
  python3 -m torch.distributed.run --standalone --nproc_per_node=1 -m titanmm.train \
      --config train_configs/llama3_8b.toml --model.n_layers=8 --training.seq_len=8192 --training.local_batch_size=1 \
      --training.dataset=mock --compile.enable=true \
      --activation_checkpoint.mode=selective --activation_checkpoint.selective_ac_option=op --training.steps=10 \
      --checkpoint.enable=false --metrics.log_freq=1 --profiling.enable_profiling=true --profiling.profile_freq=10 \
      --profiling.enable_memory_snapshot=true "--job.dump_folder=$dump" "$@" 2>&1 | grep -E "step (9|10) |Error" | tail -3
  mkdir -p "$OUT/profile"
  for f in "$dump"/profile_traces/iteration_10/rank0_kernels.txt "$dump"/memory_snapshot/iteration_10/rank0_memory_peak.txt; do
    [ -f "$f" ] && cp "$f" "$OUT/profile/$(basename "$dump")_$(basename "$f")"
  done
}
gpu_tests() {
  python3 -m pytest -m gpu "$@" -q -rA -s -p no:cacheprovider 2>&1 | tee -a "$OUT/gpu_tests.log" \
      | grep -E "passed|failed|PASSED|FAILED|Error|assert|losses" | tail -20
}
for probe in ${PROBES:-attention cudnn acnone fp8plain decode}; do
  case $probe in
    attention) echo "=== attention backends"
            python3 benchmarks/attention_backends.py --json "$OUT/attention_backends.json" 2>&1 | grep -v Warn | tail -14 ;;
    attention_test) gpu_tests tests/gpu/test_gpu_attention.py ;;
    generate_test) gpu_tests tests/gpu/test_gpu_generate.py ;;
    autocast_test) gpu_tests tests/gpu/test_gpu_training.py -k autocast ;;
    nosync_test) gpu_tests tests/gpu/test_gpu_training.py -k never_wait ;;
    profile_bf16) profile bf16 ;;
    profile_fp8) profile fp8 --float8.enable=true ;;
    bf16) compare --workload llama3_8b_proxy_bf16 ;;
    fp8) compare --workload llama3_8b_proxy_fp8 ;;
    llava) compare --workload llava_mistral_clip336_pretrain ;;
    bf16_log10) compare --workload llama3_8b_proxy_bf16 --tag log10 --log-freq 10 --steps 44 ;;
    fp8_log10) compare --workload llama3_8b_proxy_fp8 --tag log10 --log-freq 10 --steps 44 ;;
    budget*) compare --workload llama3_8b_proxy_bf16 --only titanmm --tag "memory_${probe}_log10" --log-freq 10 \
               --steps 44 --titanmm-arg=--activation_checkpoint.mode=memory_budget \
               "--titanmm-arg=--activation_checkpoint.memory_budget=0.${probe#budget}" ;;
    acnone_log10) compare --workload llama3_8b_proxy_bf16 --tag acnone_log10 --log-freq 10 --steps 44 \
               --titanmm-arg=--activation_checkpoint.mode=none \
               --peer-arg=--activation_checkpoint.mode --peer-arg=none ;;
    llava_log10) compare --workload llava_mistral_clip336_pretrain --tag log10 --log-freq 10 --steps 44 ;;
    decode_all) compare --workload decode_llama3_8b ;;
    decode_llava) compare --workload decode_llava_mistral_clip336 ;;
    decode_ablation)  # titanmm alone, batch 32, with each of ABLATIONS (decode_throughput.py --without) off
            for without in ${ABLATIONS:-fused_w13}; do for model in ${DECODE_MODELS:-llama}; do
              [ "$(left)" -gt 90 ] || { echo "=== skipped (budget): $model without $without"; continue; }
              python3 benchmarks/decode_throughput.py --model "$model" --batch 32 --compile --without "$without" \
                  --json "$OUT/decode_${model}_B32_without_${without}.json" 2>&1 | grep "titanmm generate"
            done; done ;;
    decode_prefill)  # the compiled prefill against the eager one, same machine and call
            for model in llama vlm; do for variant in --eager-prefill ""; do
              [ "$(left)" -gt 90 ] || { echo "=== skipped (budget): $model $variant"; continue; }
              python3 benchmarks/decode_throughput.py --model $model --batch 32 --compile $variant \
                  --json "$OUT/decode_${model}_B32${variant:+_eager_prefill}.json" 2>&1 | grep "titanmm generate"
            done; done ;;
    pair_profile)  # both sides of each PAIR_WORKLOADS workload profiled at step 10, read the same way
            for w in ${PAIR_WORKLOADS:-llama3_8b_proxy_fp8}; do
              rm -rf /tmp/pair_titanmm /tmp/pair_peer
              compare --workload "$w" ${GPUS:+--gpus "$GPUS"} --tag profile --steps 10 --log-freq 5 \
                  --titanmm-arg=--profiling.enable_profiling=true --titanmm-arg=--profiling.profile_freq=10 \
                  --titanmm-arg=--profiling.save_traces_folder=/tmp/pair_titanmm \
                  --peer-arg=--profiling.enable_profiling --peer-arg=--profiling.profile_freq --peer-arg=10 \
                  --peer-arg=--profiling.save_traces_folder --peer-arg=/tmp/pair_peer
              mkdir -p "$OUT/profile"
              cp /tmp/pair_titanmm/iteration_10/rank0_kernels.txt "$OUT/profile/${w}_titanmm_rank0_kernels.txt"
              python3 benchmarks/trace_breakdown.py /tmp/pair_peer/iteration_10/rank0_trace.json \
                  --title "torchtitan, $w, rank 0, step 10" --out "$OUT/profile/${w}_torchtitan_rank0_kernels.txt" \
                  | sed -n 1,16p
            done ;;
    pair_memory)  # both sides at torchtitan's checkpointing policy (op), memory snapshots at step 10 read alike
            for w in ${PAIR_WORKLOADS:-llama3_8b_fp8}; do
              rm -rf /tmp/memory_titanmm /tmp/memory_peer
              compare --workload "$w" ${GPUS:+--gpus "$GPUS"} --tag memory_op --steps 10 --log-freq 5 \
                  --titanmm-arg=--activation_checkpoint.selective_ac_option=op \
                  --titanmm-arg=--profiling.enable_memory_snapshot=true --titanmm-arg=--profiling.profile_freq=10 \
                  --titanmm-arg=--profiling.save_memory_snapshot_folder=/tmp/memory_titanmm \
                  --peer-arg=--profiling.enable_memory_snapshot --peer-arg=--profiling.profile_freq --peer-arg=10 \
                  --peer-arg=--profiling.save_memory_snapshot_folder --peer-arg=/tmp/memory_peer
              mkdir -p "$OUT/profile"
              cp /tmp/memory_titanmm/iteration_10/rank0_memory_peak.txt "$OUT/profile/${w}_op_titanmm_rank0_memory_peak.txt"
              sed -n 1,12p "$OUT/profile/${w}_op_titanmm_rank0_memory_peak.txt"
              python3 benchmarks/memory_breakdown.py /tmp/memory_peer/iteration_10/rank0_memory_snapshot.pickle \
                  --title "torchtitan, $w, op, rank 0, step 10" \
                  --out "$OUT/profile/${w}_op_torchtitan_rank0_memory_peak.txt" | sed -n 1,12p
            done ;;
    memory_default)  # titanmm alone at its defaults, a memory snapshot at step 10 (what lies between alive and reserved)
            for w in ${PAIR_WORKLOADS:-llama3_8b_bf16}; do
              rm -rf /tmp/memory_titanmm
              compare --workload "$w" ${GPUS:+--gpus "$GPUS"} --only titanmm --tag memory_default --steps 10 \
                  --log-freq 5 --titanmm-arg=--profiling.enable_memory_snapshot=true \
                  --titanmm-arg=--profiling.profile_freq=10 \
                  --titanmm-arg=--profiling.save_memory_snapshot_folder=/tmp/memory_titanmm
              mkdir -p "$OUT/profile"
              cp /tmp/memory_titanmm/iteration_10/rank0_memory_peak.txt "$OUT/profile/${w}_default_titanmm_rank0_memory_peak.txt"
              sed -n 1,40p "$OUT/profile/${w}_default_titanmm_rank0_memory_peak.txt"
            done ;;
    loss_chunks)  # titanmm alone with the output layer returning the loss (training.loss_chunk_tokens)
            for w in ${PAIR_WORKLOADS:-llama3_8b_proxy_bf16}; do for chunk in ${CHUNKS:-4096 1024}; do
              compare --workload "$w" ${GPUS:+--gpus "$GPUS"} --only titanmm --tag "loss_chunks_$chunk" --steps 34 \
                  --log-freq 10 "--titanmm-arg=--training.loss_chunk_tokens=$chunk"
            done; done ;;
    compiled_optimizer)  # titanmm alone with the AdamW update generated by torch.compile
            for w in ${PAIR_WORKLOADS:-llama3_8b_proxy_bf16}; do
              compare --workload "$w" ${GPUS:+--gpus "$GPUS"} --only titanmm --tag compiled_optimizer --steps 34 \
                  --log-freq 10 --titanmm-arg=--optimizer.implementation=compiled
            done ;;
    fp8_cast)  # FP8 all-gather: the cast before it compiled (default) against torchao's eager cast, same call
            for w in ${PAIR_WORKLOADS:-llama3_8b_fp8}; do for fused in true false; do
              compare --workload "$w" ${GPUS:+--gpus "$GPUS"} --only titanmm --tag "fused_all_gather_cast_$fused" \
                  --steps 34 --log-freq 10 "--titanmm-arg=--float8.fused_all_gather_cast=$fused"
            done; done ;;
    nccl)  # titanmm alone with NCCL's protocol / channel count set (its collectives' SMs, beside the matmuls)
            for w in ${PAIR_WORKLOADS:-llama3_8b_bf16}; do
              for env in ${NCCL_VARIANTS:-default NCCL_PROTO=Simple NCCL_MAX_NCHANNELS=8 NCCL_MAX_NCHANNELS=4}; do
                extra=(); [ "$env" = default ] || extra=("--titanmm-env=$env")
                compare --workload "$w" --gpus "${GPUS:-2}" --only titanmm --tag "nccl_${env//=/_}" --steps 34 \
                    --log-freq 10 ${extra[@]+"${extra[@]}"}
              done
            done ;;
    acnone_full)  # titanmm alone, no activation checkpointing, full 8B over GPUS
            compare --workload "${PAIR_WORKLOADS:-llama3_8b_bf16}" --gpus "${GPUS:-2}" --only titanmm --tag acnone \
                --steps 34 --log-freq 10 --titanmm-arg=--activation_checkpoint.mode=none ;;
    default_again)  # titanmm alone at its defaults, full 8B over GPUS (the A side of a same-call comparison)
            compare --workload "${PAIR_WORKLOADS:-llama3_8b_bf16}" --gpus "${GPUS:-2}" --only titanmm --tag default \
                --steps 34 --log-freq 10 ;;
    fused_projections) python3 benchmarks/fused_projections.py --json "$OUT/fused_projections.json" 2>&1 | tail -3
            python3 benchmarks/fused_projections.py --tokens 32 --forward-only --iters 100 \
                --json "$OUT/fused_projections_decode32.json" 2>&1 | tail -3 ;;
    own_pool)  # titanmm alone with FSDP2's gradients in its reduce-scatter stream's pool (as before 2026-11-23)
            compare --workload "${PAIR_WORKLOADS:-llama3_8b_bf16}" --gpus "${GPUS:-2}" --only titanmm --tag own_pool \
                --steps 34 --log-freq 10 --titanmm-arg=--parallelism.fsdp_gradients_in_compute_pool=false ;;
    step_edges)  # titanmm alone: the gradient norm in backward, the first all-gathers inside the optimizer step
            for w in ${PAIR_WORKLOADS:-llama3_8b_bf16}; do
              for variant in ${STEP_EDGE_VARIANTS:-plain grad_norm gather both}; do
                extra=()
                case $variant in grad_norm|both) extra+=(--titanmm-arg=--training.grad_norm_in_backward=true) ;; esac
                case $variant in gather|both) extra+=(--titanmm-arg=--parallelism.fsdp_gather_during_optimizer=true) ;;
                esac
                compare --workload "$w" --gpus "${GPUS:-2}" --only titanmm --tag "step_edges_$variant" --steps 34 \
                    --log-freq 10 ${extra[@]+"${extra[@]}"}
              done
            done ;;
    optimizer_step)  # the norm + clipped fused AdamW alone (full 8B over GPUS ranks, or LAYERS layers)
            python3 -m torch.distributed.run --standalone --nproc_per_node="${GPUS:-1}" benchmarks/optimizer_step.py \
                --flavor llama3_8b ${LAYERS:+--n-layers "$LAYERS"} --json "$OUT/optimizer_step.json" 2>&1 | tail -25 ;;
    decode_profile) python3 benchmarks/decode_throughput.py --flavor llama3_8b --batch 1 32 --compile \
               --json "$OUT/decode_profile.json" --profile "$OUT/profile" 2>&1 | grep "titanmm generate" ;;
    cudnn) compare --workload llama3_8b_proxy_bf16 --only titanmm --tag cudnn \
               --titanmm-arg=--model.sdpa_backends=cudnn,flash ;;
    acnone) compare --workload llama3_8b_proxy_bf16 --tag acnone --titanmm-arg=--activation_checkpoint.mode=none \
               --peer-arg=--activation_checkpoint.mode --peer-arg=none ;;
    fp8plain) compare --workload llama3_8b_proxy_fp8 --only titanmm --tag no_fp8_allgather \
               --titanmm-arg=--float8.enable_fsdp_float8_all_gather=false \
               --titanmm-arg=--float8.precompute_float8_dynamic_scale_for_fsdp=false ;;
    decode) TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 compare --workload decode_llama3_8b --only titanmm \
               --tag coordinate_descent
            compare --workload decode_llama3_8b --only peer ;;
  esac
done
echo "=== done in $((SECONDS - start)) s"
