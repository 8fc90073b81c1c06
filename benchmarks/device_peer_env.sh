# Sourced by the device scripts that run the peers (device_compare.sh, device_probe.sh), from the repository root on
# the GPU machine: the environment of every process, $OUT, the commit measured, and the peers' wheels installed.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The commit measured: what setup_peers.sh recorded (a copy of the tree on the GPU machine may carry a stale .git).
[ -f .peers/COMMIT ] && export TITANMM_COMMIT=${TITANMM_COMMIT:-$(cat .peers/COMMIT)}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# torchtitan and what it needs beyond the GPU image (all pure-Python wheels; --no-deps: the image has the rest).
python3 -m pip install -q --no-index --no-deps --find-links .device-wheels torchao torchtitan torchdata datasets \
    dill multiprocess tomli tyro typeguard docstring-parser 2>&1 | grep -v WARNING | tail -3
# megatron-energon, titanmm's image-text loader (the LLaVA SFT workload), with what it needs beyond the image.
python3 -c "import megatron.energon" 2>/dev/null || python3 -m pip install -q --no-index --find-links .device-wheels \
    megatron-energon 2>&1 | grep -v WARNING | tail -3
