#!/usr/bin/env bash
# Fetch the wheels the GPU runs need, by named set, on a machine with internet access (into folders git ignores).
#
# The GPU machine is expected to have Python 3.12 with torch, safetensors, prometheus-client, numpy, grpcio and
# protobuf, but neither Triton nor its client nor watchdog nor KvikIO, and no internet. Sets:
#
#   triton   -> .whl/          Triton, its client, watchdog (pins follow pyproject.toml); `bash bench/gpu_run.sh`
#                              installs them into the interpreter's own site-packages (the stub ignores PYTHONPATH)
#   kvikio   -> .whl/kvikio/   KvikIO for weights_transfer auto/kvikio, built for CUDA $CUDA_MAJOR (torch's; the
#                              GPU machine's torch is cu130, hence 13). --no-deps: cupy is not needed to read into
#                              torch tensors, and libcufile comes with torch's nvidia-cufile wheel
#   loaders  -> .whl/loaders/  the kvikio set and the libraries bench/loaders.py compares with (fastsafetensors,
#                              the Run:ai streamer and its one Python dependency, humanize)
#
#     bash bench/gpu_wheels.sh [SET...]   # from the repository root; default: triton. PYTHON=... picks the pip
#
# On the GPU machine: python3 -m pip install -q --no-index --no-deps .whl/loaders/*.whl (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
CUDA_MAJOR=${CUDA_MAJOR:-13}
KVIKIO=(kvikio-cu$CUDA_MAJOR==26.10.0 libkvikio-cu$CUDA_MAJOR==26.10.0 cuda-pathfinder==1.9.1 rapids-logger==0.3.0)

fetch() {  # fetch DIR WHEEL...
  local dir=$1
  shift
  mkdir -p "$dir"
  for pkg in "$@"; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
      --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$dir" "$pkg"
  done
  ls -l "$dir"
  du -ch "$dir"/*.whl | tail -n 1
}

for set in "${@:-triton}"; do
  case $set in
    triton) fetch .whl nvidia-pytriton==0.7.0 tritonclient==2.73.0 watchdog==7.1.0 python-rapidjson==1.25 ;;
    kvikio) fetch .whl/kvikio "${KVIKIO[@]}" ;;
    loaders) fetch .whl/loaders "${KVIKIO[@]}" fastsafetensors==0.5.0 runai-model-streamer==0.17.1 humanize==4.17.0 ;;
    *) echo "unknown set: $set (triton, kvikio, loaders)" >&2; exit 2 ;;
  esac
done
