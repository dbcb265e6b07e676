START=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
# Fallback: a wheel for another Python/platform fails the whole install above; then install one by one.
python3 -c "import diffusers, PIL, pytest" 2> /dev/null || {
  for wheel in .whl/*.whl; do
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" \
      || echo "[gpu_check] could not install $wheel"
  done
  export PYTHONPATH=/tmp/site:$PWD
}
# GPU check of issue 13 (run from the repository root on a CUDA machine; ends within GPU_CHECK_BUDGET_S, 420 s).
# Parts (GPU_CHECK_PARTS, default all: "tests host layers kernels vq e2e"):
#   tests:   pytest -m cuda on tests/quant (GPU ops vs their references) and tests/io (offload hooks on CUDA)
#   host:    bench/gpu_host_overhead.py -> host time per eager call of each GPU path
#   layers:  bench/gpu_layer_graph.py   -> GPU time per DiT-XL/2 layer and path (CUDA graph), Triton tile candidates
#   kernels: bench/gpu_kernels.py       -> $OUT/gpu_kernels.{json,md}  (DiT-XL/2 layer shapes, M = 1..4096, eager)
#   vq:      JIT build of the VQ CUDA extension + its tests
#   e2e:     bench/gpu_e2e.py           -> $OUT/gpu_e2e.{json,md} (DiT-XL/2 step, batch 8 guided: eager, CUDA graph,
#            torch.compile + CUDA graph per variant; GPU_E2E_EAGER / _GRAPH / _COMPILE / _COMPILE_512 pick variants)
# Every part runs under `timeout`; a failing part is recorded ($OUT/gpu_check_summary.txt, the JSONs) and the
# script goes on. GPU_CHECK_DEVICE=cpu runs the same steps as a smoke test (--quick, CPU references).
# $OUT gets one json + md per part, the summary, gpu_e2e.jsonl and gpu_logs.tgz (every log, the junit XMLs, env.txt;
# written last: the device tool brings back 8 files, so pick parts); the output ends with a compact summary.
set -u
export PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
OUT=${OUT:-/tmp/gpu_check_out}
export OUT
mkdir -p "$OUT"
BUDGET=${GPU_CHECK_BUDGET_S:-420}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
LOGS=$(mktemp -d /tmp/gpu_check_logs.XXXX)
SUMMARY="$OUT/gpu_check_summary.txt"
: > "$SUMMARY"

elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[gpu_check +$(elapsed)s] $*" | tee -a "$SUMMARY"; }
# cap WANT [RESERVE]: WANT seconds, or what is left of the budget minus RESERVE (at least 5)
cap() {
  local want=$1 left=$(( BUDGET - $(elapsed) - ${2:-15} ))
  (( left < want )) && want=$left
  (( want < 5 )) && want=5
  echo "$want"
}
step() {  # step NAME SECONDS CMD...: run with a timeout, log status; never fails the script
  local name=$1 seconds=$2
  shift 2
  log "start $name (timeout ${seconds}s)"
  timeout -k 5 "$seconds" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  grep -Ev '^(SKIPPED|[.sFExX]+ *(\[ *[0-9]+%\])?$)' "$LOGS/$name.log" | tail -n 8 | cut -c1-300
  log "end $name: rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)')"
  return 0
}

PARTS=${GPU_CHECK_PARTS:-tests host layers kernels vq e2e}  # any subset, e.g. GPU_CHECK_PARTS="tests e2e"
want() { [[ " $PARTS " == *" $1 "* ]]; }

# -- 0. environment -------------------------------------------------------------------------------------------
{
  nvidia-smi -L 2>&1 || true
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.version.cuda, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" 2>&1
  python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  python3 -c "import diffusers, pytest; print('diffusers', diffusers.__version__, 'pytest', pytest.__version__)" 2>&1 | tail -1
  echo "nvcc: $(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || echo none)"
  echo "ninja: $(command -v ninja || echo none)"
} > "$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"
if [[ "$DEVICE" == cpu ]]; then QUICK=(--device cpu --quick); else QUICK=(); fi

# -- 1a. VQ CUDA extension: JIT build in the background (only where nvcc exists) --------------------------------
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext MAX_JOBS=8  # leaves cores for the tests and benchmarks meanwhile
BUILD_PID=""
if [[ "$DEVICE" == cuda ]] && want vq; then
  [[ -z "$(command -v nvcc)" && -x /usr/local/cuda/bin/nvcc ]] && export CUDA_HOME=/usr/local/cuda PATH=/usr/local/cuda/bin:$PATH
  TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
  export TORCH_CUDA_ARCH_LIST
  if command -v nvcc > /dev/null && command -v ninja > /dev/null; then
    log "building the VQ CUDA extension in the background (arch $TORCH_CUDA_ARCH_LIST)"
    COMPRESSDIT_JIT_CUDA=1 timeout -k 5 "$(cap 200 120)" python3 -c "from compressdit.quant.vq_ops import \
cuda_extension_available as ok; print('VQ CUDA extension loads:', ok())" > "$LOGS/vq_build.log" 2>&1 &
    BUILD_PID=$!
  else
    log "no nvcc or ninja: the VQ CUDA extension cannot be built; VQ runs its PyTorch reference"
  fi
fi

# -- 1b. CUDA tests of the GPU ops (all cuda-marked files of tests/quant except the VQ ones) ---------------------
TEST_FILES=$(grep -l "mark.cuda" tests/quant/test_*.py | grep -v test_quant_vq_ops.py | tr '\n' ' ')
TEST_FILES="$TEST_FILES $(grep -l "mark.cuda" tests/io/test_*.py | tr '\n' ' ')"
# shellcheck disable=SC2086
want tests && step pytest_gpu_ops "$(cap 130 240)" python3 -m pytest -q -p no:cacheprovider -m cuda -rfEs \
  --continue-on-collection-errors --junitxml="$LOGS/pytest_gpu_ops.xml" $TEST_FILES

# -- 1d. host cost of one eager call per GPU path (eager steps are host-bound) ------------------------------------
want host && step gpu_host_overhead "$(cap 45 200)" python3 bench/gpu_host_overhead.py --out "$OUT"

# -- 1e. GPU time per layer and path (CUDA graph of 20 calls: no host overhead), Triton tile candidates ----------
want layers && step gpu_layer_graph "$(cap 60 150)" python3 bench/gpu_layer_graph.py --out "$OUT"

# -- 2. per-layer kernels (VQ rows use the CUDA kernels if their background build is done by now) ---------------
vq_ready() { [[ -f "$LOGS/vq_build.log" ]] && grep -q "loads: True" "$LOGS/vq_build.log"; }
VQ_JIT=0
vq_ready && VQ_JIT=1
log "VQ CUDA extension built: $VQ_JIT"
KERNEL_S=$(cap 100 160)
want kernels && step gpu_kernels "$KERNEL_S" env COMPRESSDIT_JIT_CUDA=$VQ_JIT python3 bench/gpu_kernels.py ${QUICK[@]+"${QUICK[@]}"} \
  --out "$OUT" --budget-s $(( KERNEL_S - 25 ))

# -- 1c. VQ kernel tests (wait for the build until +200 s at most; without it they skip) --------------------------
if want vq && [[ -n "$BUILD_PID" ]]; then
  while kill -0 "$BUILD_PID" 2> /dev/null && (( $(elapsed) < 200 )); do sleep 2; done
  tail -n 5 "$LOGS/vq_build.log"
fi
VQ_JIT=0
vq_ready && VQ_JIT=1
log "VQ CUDA extension built: $VQ_JIT"
want vq && step pytest_vq "$(cap 45 130)" env COMPRESSDIT_JIT_CUDA=$VQ_JIT python3 -m pytest -q -p no:cacheprovider -m cuda -rfEs \
  --junitxml="$LOGS/pytest_vq.xml" tests/quant/test_quant_vq_ops.py

# -- 3. end to end: eager (every variant), CUDA-graph replays (GPU time), then torch.compile + CUDA graph per
#       variant (one process each, while time is left: Inductor fuses the row quantization into the norm) --------
rm -f "$OUT/gpu_e2e.jsonl"
if want e2e; then
  # GPU_E2E_EAGER / GPU_E2E_GRAPH / GPU_E2E_COMPILE: variants per mode ("" skips the mode);
  # GPU_E2E_COMPILE_512: variants also compiled + graphed at 512 px (1024 tokens per image) when time is left
  EAGER=${GPU_E2E_EAGER-bf16 w8a8 fp8 int4}
  GRAPH=${GPU_E2E_GRAPH-bf16 w8a8 fp8 int4}
  # shellcheck disable=SC2086
  [[ -n "$EAGER" ]] && step gpu_e2e_eager "$(cap 80 60)" python3 bench/gpu_e2e.py ${QUICK[@]+"${QUICK[@]}"} \
    --variants $EAGER --append "$OUT/gpu_e2e.jsonl"
  # shellcheck disable=SC2086
  [[ -n "$GRAPH" ]] && step gpu_e2e_graph "$(cap 80 60)" python3 bench/gpu_e2e.py ${QUICK[@]+"${QUICK[@]}"} --graph \
    --variants $GRAPH --append "$OUT/gpu_e2e.jsonl"
  for variant in ${GPU_E2E_COMPILE-bf16 w8a8 fp8 w8a8-triton int4}; do  # shipped (registry) first
    if (( BUDGET - $(elapsed) < 45 )); then
      log "no time left to compile $variant"
      echo "{\"variant\": \"$variant\", \"compiled\": \"compile+graph\", \"batch\": 8, \"error\": \"skipped: time budget\"}" \
        >> "$OUT/gpu_e2e.jsonl"
      continue
    fi
    step "gpu_e2e_compile_$variant" "$(cap 100 30)" python3 bench/gpu_e2e.py ${QUICK[@]+"${QUICK[@]}"} --compile \
      --graph --variants "$variant" --append "$OUT/gpu_e2e.jsonl"
  done
  for variant in ${GPU_E2E_COMPILE_512-}; do
    if (( BUDGET - $(elapsed) < 55 )); then log "no time left to compile $variant at 512 px"; continue; fi
    step "gpu_e2e_compile512_$variant" "$(cap 100 30)" python3 bench/gpu_e2e.py ${QUICK[@]+"${QUICK[@]}"} --compile \
      --graph --sample-size 64 --variants "$variant" --append "$OUT/gpu_e2e.jsonl"
  done
  step gpu_e2e_report "$(cap 20 5)" python3 bench/gpu_e2e.py --report "$OUT/gpu_e2e.jsonl" --out "$OUT"
fi
log "done in $(elapsed)s; results in $OUT"
tar -czf "$OUT/gpu_logs.tgz" -C "$LOGS" . 2>/dev/null || log "could not tar the logs"

# -- compact summary (the last lines of the output) ------------------------------------------------------------
echo
echo "==================== gpu_check summary ===================="
head -n 3 "$LOGS/env.txt" | cut -c1-200
echo "-- gpu_kernels.md (head; full file in \$OUT)"
head -c 2500 "$OUT/gpu_kernels.md" 2>/dev/null || echo "(no gpu_kernels.md)"
echo
echo "-- gpu_layer_graph.md"
cut -c1-200 "$OUT/gpu_layer_graph.md" 2>/dev/null | head -c 3500 || echo "(no gpu_layer_graph.md)"
echo "-- gpu_host_overhead.md (head)"
head -c 1200 "$OUT/gpu_host_overhead.md" 2>/dev/null || echo "(no gpu_host_overhead.md)"
echo
echo "-- gpu_e2e.md"
cut -c1-400 "$OUT/gpu_e2e.md" 2>/dev/null | head -c 3500 || echo "(no gpu_e2e.md)"
echo "-- step status"
grep -E 'end |no time|VQ CUDA|done in' "$SUMMARY" | sed 's/^\[gpu_check //'
for name in pytest_gpu_ops pytest_vq; do
  echo "-- $name: $(grep -E '(passed|failed|error|skipped|deselected)( |,|$)' "$LOGS/$name.log" 2>/dev/null | tail -n 1)"
  grep -E '^(FAILED|ERROR) ' "$LOGS/$name.log" 2>/dev/null | cut -c1-220 | head -n 15
done
echo "-- files in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
exit 0
