#!/usr/bin/env bash
# On this (development) machine, before the device call of benchmarks/device_compare.sh: fill the git-ignored
#   .peers/          the peers' benchmark scripts, copied from ../shared/peers (torchtitan/, transformers/), and
#                    COMMIT, the titanmm commit being measured (the GPU machine's copy of the tree has no .git);
#   .device-wheels/  torchtitan 0.2.2, torchao 0.18.0 and megatron-energon 7.4.1 (titanmm's image-text loader, for the
#                    LLaVA SFT workload) with the dependencies the GPU image lacks.
# Carry both (`carry: [".peers", ".device-wheels"]`; together well under the 64 MiB limit).
#   bash benchmarks/setup_peers.sh            (SHARED=DIR to take the peers and wheels.sh from elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared}
[ -d "$shared/peers" ] || { echo "no $shared/peers" >&2; exit 2; }
rm -rf .peers
mkdir -p .peers
cp -r "$shared"/peers/* .peers/
{ git rev-parse HEAD 2>/dev/null || echo unknown; } | tr -d '\n' > .peers/COMMIT
git diff --quiet HEAD 2>/dev/null || printf -- "-dirty" >> .peers/COMMIT
echo >> .peers/COMMIT
if ls .device-wheels/torchtitan-0.2.2-*.whl >/dev/null 2>&1 && ls .device-wheels/torchao-0.18.0-*.whl >/dev/null 2>&1 \
    && ls .device-wheels/tyro-*.whl >/dev/null 2>&1 && ls .device-wheels/megatron_energon-7.4.1-*.whl >/dev/null 2>&1 \
    && ls .device-wheels/webdataset-*.whl >/dev/null 2>&1; then
  echo "wheels: torchtitan 0.2.2, torchao 0.18.0 and megatron-energon 7.4.1 already in .device-wheels"
else
  bash "$shared/device/wheels.sh" .device-wheels torchtitan==0.2.2 torchao==0.18.0 megatron-energon==7.4.1
fi
# energon's s3fs pins fsspec to its own release; the image's older fsspec counts as present for wheels.sh.
s3fs=$(ls .device-wheels/s3fs-*.whl | head -1); s3fs=${s3fs##*/s3fs-}; s3fs=${s3fs%%-*}
ls .device-wheels/fsspec-"$s3fs"-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps -d .device-wheels \
    --python-version 3.12 --only-binary=:all: "fsspec==$s3fs"
# multi-storage-client (energon's) needs a newer filelock than the image's, which wheels.sh counts as present.
msc=$(ls .device-wheels/multi_storage_client-*.whl | head -1)
filelock=$(unzip -p "$msc" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: filelock *\([^;]*\).*/\1/p' | tr -d ' ()')
ls .device-wheels/filelock-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps -d .device-wheels \
    --python-version 3.12 --only-binary=:all: "filelock${filelock}"
du -sh .peers .device-wheels
du -sch .peers .device-wheels | tail -1
