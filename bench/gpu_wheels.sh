#!/usr/bin/env bash
# Fetch the wheels the GPU benchmarks need into .whl/ (ignored by git), on a machine with internet access.
#
# The GPU machine is expected to have Python 3.12 with torch, safetensors, prometheus-client, numpy, grpcio and
# protobuf, but neither Triton nor its client nor watchdog, and no internet. `bash bench/gpu_run.sh` installs
# these wheels there into the interpreter's own site-packages (Triton's Python stub ignores PYTHONPATH).
# The pins follow pyproject.toml (nvidia-pytriton==0.7.0, tritonclient>=2.51, watchdog>=4).
#
#     bash bench/gpu_wheels.sh            # from the repository root; PYTHON=... to pick the pip that downloads
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
WHEELS=(nvidia-pytriton==0.7.0 tritonclient==2.73.0 watchdog==7.1.0 python-rapidjson==1.25)
mkdir -p .whl
for pkg in "${WHEELS[@]}"; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg"
done
ls -l .whl
du -ch .whl/*.whl | tail -n 1
