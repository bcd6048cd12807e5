#!/usr/bin/env bash
# One call on the GPU machine (see docs/gpu.md): `bench/gpu_run.sh refit` or `bench/gpu_run.sh serve`.
# Writes everything to $OUT (JSON, logs). Each step has its own time limit so that a hang cannot eat the call.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step() { local name=$1 limit=$2; shift 2; echo "== $name ($(date +%T))"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1;
         echo "   rc=$? ($(date +%T))"; tail -n 12 "$OUT/$name.log"; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv
  nproc; free -g; df -h /dev/shm /tmp; python3 -c 'import torch; print(torch.__version__, torch.version.cuda)'; } \
  > "$OUT/env.txt" 2>&1
case "${1:-refit}" in
  refit)
    step pytest 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_fastpath_cuda.py
    step refit_fp16 260 python3 -m bench.gpu_refit --json "$OUT/refit_fp16.json" --sizes 1,4,16 --dtype float16 \
      --engines eager --baseline-gb 1
    step refit_aoti 150 python3 -m bench.gpu_refit --json "$OUT/refit_aoti.json" --sizes 4 --dtype float16 \
      --engines aoti --baseline-gb 0
    step refit_bf16_cast 60 python3 -m bench.gpu_refit --json "$OUT/refit_bf16_cast.json" --sizes 4 --dtype bfloat16 \
      --checkpoint-dtype float32 --engines eager --strategies double_buffer --baseline-gb 0
    ;;
  serve)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1
    export PYTHONPATH=$PYTHONPATH:/tmp/site
    step serve_swap 300 python3 -m bench.gpu_serve_swap --json "$OUT/serve_swap.json" --swaps 20 \
      --triton-log "$OUT/triton.log"
    step refit_big 230 python3 -m bench.gpu_refit --json "$OUT/refit_big.json" --sizes "" --engines eager \
      --baseline-gb 0 --big-in-place "${BIG_GB:-45}"
    ;;
  serve2)
    python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl > "$OUT/pip.log" 2>&1  # the stub sees
    # only the interpreter's own site-packages (not PYTHONPATH), so the wheels go there
    step serve_swap 200 python3 -m bench.gpu_serve_swap --json "$OUT/serve_swap.json" --swaps 20 \
      --triton-log "$OUT/triton.log"
    step refit_defaults 100 python3 -m bench.gpu_refit --json "$OUT/refit_defaults.json" --sizes 4,16 \
      --engines eager --strategies double_buffer,in_place --baseline-gb 0
    ;;
  serve3)
    python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl > "$OUT/pip.log" 2>&1
    step serve_swap_sync 200 python3 -m bench.gpu_serve_swap --json "$OUT/serve_swap_sync.json" --swaps 20 \
      --sync-outputs --triton-log "$OUT/triton.log"
    ;;
  serve4)
    python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl > "$OUT/pip.log" 2>&1
    step serve_swap_cpu_out 150 python3 -m bench.gpu_serve_swap --json "$OUT/serve_swap_cpu_out.json" --swaps 20 \
      --strategies double_buffer --cpu-outputs --triton-log "$OUT/triton.log"
    ;;
  final)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1
    export PYTHONPATH=$PYTHONPATH:/tmp/site
    step serve_swap 240 python3 -m bench.gpu_serve_swap --json "$OUT/serve_swap.json" --swaps 20 \
      --triton-log "$OUT/triton.log"
    step sweep_b8_32 45 python3 -m bench.gpu_refit --json "$OUT/sweep_b8_32.json" --sizes 4 --engines eager \
      --strategies double_buffer --baseline-gb 0 --buffers 8 --buffer-mb 32 --probe-register
    step sweep_t8 45 python3 -m bench.gpu_refit --json "$OUT/sweep_t8.json" --sizes 4 --engines eager \
      --strategies double_buffer --baseline-gb 0 --threads 8
    step sweep_r16m 45 python3 -m bench.gpu_refit --json "$OUT/sweep_r16m.json" --sizes 4 --engines eager \
      --strategies double_buffer --baseline-gb 0 --read-kb 16384 --buffers 6
    step aoti_small 100 python3 -X faulthandler -m bench.gpu_refit --json "$OUT/aoti_small.json" --sizes 0.5 \
      --width 4096 --engines aoti --strategies double_buffer --baseline-gb 0 --repeats 2
    ;;
esac
echo "== done $(date +%T)"
