#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one command of about 6 minutes on an H200:
#
#   bench/gpu_check.sh                # the default parts, in this order
#   bench/gpu_check.sh head e2e       # only these parts (a part that failed can be rerun alone)
#   bench/gpu_check.sh compile aoti   # the two that spend minutes compiling, when time allows
#
# Parts: setup (install rali-edge with --no-deps: the machine has its own torch and no network;
# build the random ViT-L model the parts share), tests (the GPU-marked tests, and the kernel's
# test file compiled), head (the Triton head against eager and torch.compile, B = 1 to 4096,
# fp16 and fp32 class tokens), encoder (eager fp16/bf16 with and without a CUDA graph; batch 1 to
# 256), e2e (12 MP JPEG files to scores, against the published pipeline and decoding alone),
# profile (`rali-edge profile` with NVML power against the Qwen2.5-VL-7B architecture with random
# weights), stream (four looping video sources through `rali-edge stream`'s runtime); compile
# (torch.compile of the encoder) and aoti (an AOTInductor engine). The results go to
# bench/results/<gpu>/ and, when $OUT is set, to $OUT (summary.md, gpu_check.log,
# results.tar.gz). Without a GPU: one line, exit 4.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ALL=(setup tests head encoder e2e profile stream compile aoti)
DEFAULT=(setup tests head encoder e2e profile stream)
PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=("${DEFAULT[@]}")
for part in "${PARTS[@]}"; do
  [[ " ${ALL[*]} " == *" $part "* ]] || { echo "gpu_check: unknown part '$part'; parts: ${ALL[*]}" >&2; exit 2; }
done

GPU=$("$PY" - <<'EOF' 2>/dev/null
import re, torch
if torch.cuda.is_available():
    print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))
EOF
)
if [ -z "$GPU" ]; then
  echo "gpu_check: no CUDA GPU visible to torch ($PY); these checks need one (see bench/results/ for earlier runs)" >&2
  exit 4
fi

RES=bench/results/$GPU
WORK=${GPU_CHECK_WORK:-/tmp/rali-gpu-check}
mkdir -p "$RES" "$WORK"
LOG=$RES/gpu_check.log
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 RALI_EDGE_CACHE=$WORK/engine-cache TRITON_DEFAULT_FP_FUSION=1
failed=()

run_part() {  # run_part NAME SECONDS: a part that fails or runs past its time is reported, the others go on
  local name=$1 limit=$2 t0=$SECONDS
  echo "== $name (at most ${limit} s)" | tee -a "$LOG"
  if timeout "$limit" bash -c "set -o pipefail; part_$name" 2>&1 | tee -a "$LOG"; then
    echo "== $name: done in $((SECONDS - t0)) s" | tee -a "$LOG"
  else
    echo "== $name: FAILED after $((SECONDS - t0)) s (rerun alone: bench/gpu_check.sh $name)" | tee -a "$LOG"
    failed+=("$name")
  fi
}

part_setup() {
  { echo "# $GPU: environment"; echo; echo '```'; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.limit --format=csv
    "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| CUDA', torch.version.cuda)"
    git log -1 --format='rali-edge commit %H (%cd)' 2>/dev/null; echo '```'; } > "$RES/env.md"
  "$PY" -m pip install -q --no-deps --no-build-isolation --disable-pip-version-check . || return 1
  cat "$RES/env.md"
  "$PY" bench/gpu.py model "$WORK"  # the random ViT-L model the other parts share (~20 s on the CPU)
}
part_tests() {  # the GPU-marked tests, then the kernel's tests compiled (conftest interprets only without a GPU)
  local workers=()
  "$PY" -c "import xdist" 2>/dev/null && workers=(-n 8)
  local rc=0  # both runs, whatever the first gives (slow: the AOTInductor build is the aoti part's)
  "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" -m "(gpu or tensorrt) and not slow" tests/ \
    --ignore=tests/test_kernel_head.py --ignore=tests/test_head.py || rc=1
  "$PY" -m pytest -q -p no:cacheprovider "${workers[@]}" -m "not slow" tests/test_kernel_head.py tests/test_head.py || rc=1
  return $rc
}
# torch.compile's default mode: max-autotune (bench/head.py's default) takes minutes at 10 shapes.
part_head() { "$PY" bench/head.py --compile-mode default --batches 1,8,64,4096 --out "$RES/head.md"; }
part_encoder() { "$PY" bench/gpu.py encoder "$WORK" "$RES/encoder.md"; }
part_compile() { "$PY" bench/gpu.py compile "$WORK" "$RES/compile.md"; }
part_e2e() { "$PY" bench/gpu.py e2e "$WORK" "$RES/e2e.md"; }
part_aoti() { "$PY" bench/gpu.py aoti "$WORK" "$RES/aoti.md"; }
part_profile() {
  local model
  model=$("$PY" bench/gpu.py model "$WORK" | tail -1) || return 1
  # Batches up to 32: profile decodes its 12 MP photographs in the timed loop, one at a time.
  "$PY" -m rali_edge.cli profile --model "$model" --device cuda --batch-sizes 1,8,32 --warmup 1 --duration 2 \
    --power nvml --idle-seconds 2 --baseline qinsight --baseline-random-weights --baseline-config 7b \
    --baseline-images 1 --baseline-tokens 64 --report "$RES/profile" && cp "$RES/profile/profile.md" "$RES/profile.md"
}
part_stream() {
  local model
  model=$("$PY" bench/gpu.py model "$WORK" | tail -1) || return 1
  "$PY" bench/stream_soak.py --sources 4 --seconds 15 --sample-every 3 --model "$model" --device cuda \
    --dtype fp16 --max-batch 8 --json "$RES/stream.json" | tee "$RES/stream.md"
}

export PY GPU RES WORK LOG
export -f part_setup part_tests part_head part_encoder part_compile part_e2e part_profile part_stream part_aoti
# Seconds per part: the default parts take about 6 minutes on an H200; compile and aoti (minutes
# of compiling each) run when named: bench/gpu_check.sh compile aoti.
declare -A LIMIT=([setup]=60 [tests]=100 [head]=75 [encoder]=45 [e2e]=50 [profile]=100 [stream]=40
                  [compile]=120 [aoti]=200)
# A part run alone on a fresh machine still needs the package installed.
if [[ " ${PARTS[*]} " != *" setup "* ]] && ! "$PY" -c "import rali_edge.kernels" 2>/dev/null; then
  PARTS=(setup "${PARTS[@]}")
fi
for part in "${PARTS[@]}"; do
  run_part "$part" "${LIMIT[$part]}"
done

{ echo "# gpu_check on $GPU, $(date -u +%Y-%m-%dT%H:%MZ): ${PARTS[*]}"; echo
  [ ${#failed[@]} -gt 0 ] && echo "FAILED: ${failed[*]}" && echo
  for f in env encoder compile aoti e2e head profile stream; do [ -f "$RES/$f.md" ] && cat "$RES/$f.md" && echo; done
  grep -E "passed|failed|error" "$LOG" | grep -E "^[0-9=]" | tail -4; } > "$RES/summary.md"
if [ -n "${OUT:-}" ]; then
  cp "$RES/summary.md" "$LOG" "$OUT/" && tar -czf "$OUT/results.tar.gz" -C bench/results "$GPU"
fi
[ ${#failed[@]} -eq 0 ] || { echo "gpu_check: failed parts: ${failed[*]}" >&2; exit 1; }
