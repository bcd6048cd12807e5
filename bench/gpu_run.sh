#!/usr/bin/env bash
# The GPU benchmark suites (docs/gpu.md). On the GPU machine, from a copy of the repository with .whl/ filled by
# bench/gpu_wheels.sh:
#
#     OUT=results bash bench/gpu_run.sh SUITE...  # refit | transfer | loaders | triton_cuda | big | serve | publish | variants |
#                                                 # aoti | inductor | serve_inductor | real | instances | soak | all
#
# Each suite fits one 10-minute call; each step has its own time limit, so a hang costs that step only. Results go
# to $OUT (default ./gpu-out): one JSON per step, named as in bench/results/ (TAG is the GPU's model, e.g. h200),
# the step's log, env.txt. The exit status is 1 if any step failed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export HOTSWAP_COMMIT=${HOTSWAP_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || true)}
TAG=${TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | awk '{print tolower($NF)}')}
TAG=${TAG:-gpu}
FAILED=0

step() {  # step NAME SECONDS COMMAND...: run under a time limit, output to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, $(date +%T))"
  timeout --kill-after=30 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc ($(date +%T))"
  [ "$rc" -eq 0 ] || FAILED=1
  tail -n 12 "$OUT/$name.log"
}

stdout_step() {  # stdout_step NAME SECONDS COMMAND...: as step, the command's stdout (its JSON) to $OUT/NAME.json
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" bash -c '"${@:2}" > "$1"' _ "$OUT/$name.json" "$@"
}

version_output_flag() {  # Triton 2.51's stub cannot send a string output under numpy 2 (docs/gpu.md)
  python3 -c 'import numpy, sys; sys.exit(int(numpy.__version__.split(".")[0]) < 2)' && echo --no-version-output
}

wheels() {  # Triton, its client and watchdog into the interpreter's own site-packages (the stub ignores PYTHONPATH)
  if ! compgen -G ".whl/*.whl" > /dev/null; then
    echo "!! no .whl/*.whl: run bash bench/gpu_wheels.sh on a machine with internet first (docs/gpu.md)"
    FAILED=1
    return
  fi
  step pip-install 120 python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl
}

suite_refit() {  # the fast path by size, the host path beside it, a cast on the device, publish through the watcher
  step cuda-tests 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fastpath_cuda.py
  step "gpu-refit-$TAG" 260 python3 -m bench.gpu_refit --json "$OUT/gpu-refit-$TAG.json" --sizes 1,4,16 \
    --dtype float16 --engines eager --baseline-gb 1
  step "gpu-refit-cast-$TAG" 60 python3 -m bench.gpu_refit --json "$OUT/gpu-refit-cast-$TAG.json" --sizes 4 \
    --dtype bfloat16 --checkpoint-dtype float32 --engines eager --strategies double_buffer --baseline-gb 0
  stdout_step "publish-$TAG-cuda-double_buffer" 50 python3 bench/publish.py --json --device cuda --repeats 7
  stdout_step "publish-$TAG-cuda-in_place" 50 python3 bench/publish.py --json --device cuda --strategy in_place \
    --repeats 7
}

kvikio_wheels() {  # KvikIO (and the libraries bench/loaders.py compares with) from bench/gpu_wheels.sh loaders|kvikio
  local dir
  for dir in .whl/loaders .whl/kvikio; do
    if compgen -G "$dir/*.whl" > /dev/null; then
      step "pip-install-${dir#.whl/}" 120 python3 -m pip install -q --no-index --no-deps --no-compile "$dir"/*.whl
      return
    fi
  done
  echo "!! no .whl/loaders or .whl/kvikio: the KvikIO steps skip or fall back (bash bench/gpu_wheels.sh loaders)"
}

suite_transfer() {  # KvikIO against the pinned ring: the GPU tests of both, refits by size
  kvikio_wheels
  step cuda-transfer-tests 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kvikio_cuda.py \
    tests/gpu/test_fastpath_cuda.py
  # not gpu-refit-transfer-TAG: that name holds the run that retired registered transfers
  step "gpu-refit-kvikio-$TAG" 300 python3 -m bench.gpu_refit --json "$OUT/gpu-refit-kvikio-$TAG.json" \
    --sizes 1,4,16 --dtype float16 --engines eager --strategies double_buffer --transfers pinned,kvikio \
    --baseline-gb 0
}

suite_loaders() {  # a 16 GB file into preallocated GPU tensors: our readers, KvikIO, fastsafetensors, Run:ai, safe_open
  kvikio_wheels
  step "loaders-$TAG" 420 python3 -m bench.loaders --json "$OUT/loaders-$TAG.json"
}

suite_triton_cuda() {  # the example transformer through Triton on a GPU instance: inductor, auto, aoti
  step cuda-triton-tests 400 python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_triton_cuda.py
}

suite_big() {  # in place, a model larger than half the GPU memory it has (a ballast takes the rest)
  step "gpu-refit-big-$TAG" 300 python3 -m bench.gpu_refit --json "$OUT/gpu-refit-big-$TAG.json" --sizes "" \
    --engines eager --baseline-gb 0 --big-in-place "${BIG_GB:-45}"
}

suite_serve() {  # zero downtime on a real Triton with a KIND_GPU instance, both refit strategies
  step "gpu-serve-swap-$TAG" 300 python3 -m bench.gpu_serve_swap --json "$OUT/gpu-serve-swap-$TAG.json" \
    --swaps 20 --triton-log "$OUT/triton-serve-swap.log"
}

suite_publish() {  # publish -> first response through Triton by model size, beside Triton's own reload
  kvikio_wheels
  step "gpu-publish-kvikio-$TAG" 540 python3 -m bench.gpu_publish --json "$OUT/gpu-publish-kvikio-$TAG.json" \
    --sizes 1,4,16 --swaps 6 --versions 6 --baseline-swaps 1 $(version_output_flag)
  stdout_step "publish-${TAG}host-cpu$(nproc)" 60 python3 bench/publish.py --json
}

suite_variants() {  # 16 GB through Triton in one server: the defaults (8 KvikIO threads) beside 12 and 16
  kvikio_wheels
  step "gpu-publish-variants-$TAG" 540 python3 -m bench.gpu_publish --json "$OUT/gpu-publish-variants-$TAG.json" \
    --sizes 16 --swaps 6 --versions 6 --baseline-swaps 0 --variant defaults \
    --variant threads12:weights_reader_threads=12 --variant threads16:weights_reader_threads=16 $(version_output_flag)
}

suite_aoti() {  # the AOTInductor engine on CUDA
  step "gpu-refit-aoti-$TAG" 150 python3 -X faulthandler -m bench.gpu_refit --json "$OUT/gpu-refit-aoti-$TAG.json" \
    --sizes 0.5 --dtype float16 --engines aoti --strategies double_buffer --baseline-gb 0 --repeats 2
}

suite_inductor() {  # the inductor engine on CUDA, the aoti loader probe, startup and latency figures (no Triton needed)
  step cuda-inductor-tests 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_inductor_cuda.py
  step aoti-probe-cpu-pkg 240 python3 bench/aoti_load_probe.py --device cpu --out "$OUT/aoti-load-probe-cpu-pkg-$TAG.json"
  step aoti-probe-cuda-pkg 240 python3 bench/aoti_load_probe.py --device cuda \
    --out "$OUT/aoti-load-probe-cuda-pkg-$TAG.json"
  step "inductor-startup-$TAG" 120 python3 bench/inductor_startup.py --device cuda --dtype float16 --d-model 2048 \
    --layers 4 --out "$OUT/inductor-startup-$TAG.json"
  step "engine-latency-$TAG" 120 python3 bench/engine_latency.py --device cuda --dtype float16 --d-model 2048 \
    --layers 4 --batches 1,8 --engines eager,inductor,inductor_frozen --out "$OUT/engine-latency-$TAG.json"
  step "engine-latency-graphs-$TAG" 90 python3 bench/engine_latency.py --device cuda --dtype float16 --d-model 2048 \
    --layers 4 --batches 1,8 --engines eager,inductor,inductor_frozen --cuda-graphs \
    --out "$OUT/engine-latency-graphs-$TAG.json"
}

suite_serve_inductor() {  # zero downtime on a real Triton, the inductor engine on a KIND_GPU instance
  step "gpu-serve-swap-inductor-$TAG" 300 python3 -m bench.gpu_serve_swap --engine inductor --no-version-output \
    --json "$OUT/gpu-serve-swap-inductor-$TAG.json" --swaps 20 --triton-log "$OUT/triton-serve-swap-inductor.log"
}

suite_real() {  # real architectures (ResNet-18/50, torchvision's ResNet-50, BERT-base) per engine; torchvision test
  step cuda-torchvision-tests 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_torchvision_cuda.py
  step "real-refit-$TAG" 300 python3 bench/real_refit.py --device cuda --engines eager,inductor \
    --models tv-resnet18,tv-resnet50,bert-base --repeats 3 --json "$OUT/real-refit-$TAG.json"
}

suite_instances() {  # one model on 1 and 2 instances of one GPU: every instance live, and the bytes each stub read
  step "gpu-instances-$TAG" 300 python3 -m bench.gpu_instances --json "$OUT/gpu-instances-$TAG.json" --size-gb 16 \
    --instances 1,2 --swaps 3
}

suite_soak() {  # a 1 GB model through 300 publishes and LoRA adapters under client load: errors, torn, resources flat
  step "soak-$TAG" 540 python3 -m bench.soak --kind KIND_GPU --size-gb 1 --swaps 300 --sample-every 25 \
    --warmup-swaps 100 --time-limit-s 420 --json "$OUT/soak-$TAG.json"
}

suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(refit)
for s in "${suites[@]}"; do
  case $s in
    refit | triton_cuda | big | serve | publish | variants | aoti | inductor | serve_inductor | real | instances | soak | all)
      NEED_TRITON=1 ;;
    transfer | loaders) ;;
    *) echo "unknown suite '$s': refit, transfer, loaders, triton_cuda, big, serve, publish, variants, aoti, inductor, serve_inductor, real, instances, soak or all" >&2; exit 2 ;;
  esac
done
{ nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv
  nproc; free -g; df -h /dev/shm "${TMPDIR:-/tmp}"
  python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)'
  echo "commit ${HOTSWAP_COMMIT:-unknown}, tag $TAG"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
[ -z "${NEED_TRITON:-}" ] || wheels
for s in "${suites[@]}"; do
  if [ "$s" = all ]; then
    for t in refit transfer loaders triton_cuda big serve publish variants aoti inductor serve_inductor real instances soak; do
      "suite_$t"
    done
  else
    "suite_$s"
  fi
done
echo "== done $(date +%T); results in $OUT"
exit "$FAILED"
