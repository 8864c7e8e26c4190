#!/usr/bin/env bash
# The GPU check of #20 in one run: on an H100/H200 in under 8 minutes it runs
#   1. bench/pipeline.py with LLaVA-1.5-7B + SAM ViT-L shapes (random weights), fp16 and bf16: ours on a new and on a
#      cached frame against the naive F-LMM way, time-to-mask vs time-to-answer;
#   2. bench/refiner.py for SAM ViT-L (torch fp32 against every backend that runs there);
#   3. bench/tracking.py in the same 7B + SAM ViT-L configuration: a tracking update per frame against re-grounding
#      every frame (#17);
#   4. the GPU-only tests (tests/test_gpu.py, tests/test_sam_tensorrt.py);
# and writes every table, the JSON results, the environment and SUMMARY.md (device named) to one folder.
#
#   bash bench/gpu_check.sh [OUT_DIR]                 # on the GPU machine (default OUT_DIR: out/gpu_check)
#   bash bench/gpu_check.sh --smoke [OUT_DIR]         # the same steps, small configuration on the CPU (CI)
#   bash bench/gpu_check.sh --wheels DIR [OUT_DIR]    # first pip-install the wheels in DIR (no index, no deps)
#
# A step that fails or runs out of its time is recorded and the next one still runs; the exit code is that of
# the first failed step (0 when all passed). Without the project's .venv (a bare GPU machine) it uses python3
# with PYTHONPATH set to the package.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
WHEELS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=smoke; shift ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
OUT=${1:-out/gpu_check}
mkdir -p "$OUT"

if [ -f .venv/bin/activate ]; then
  set +u   # colcon's setup scripts read unset variables
  # shellcheck disable=SC1091
  source scripts/env.sh
  set -u
else
  export PYTHONPATH="$PWD/ros_ws/src/flmm_ros${PYTHONPATH:+:$PYTHONPATH}"
fi
PYTHON=$(command -v python || command -v python3)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}    # sleeping OpenMP threads (see scripts/run_tests.sh)
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error

if [ "$MODE" = smoke ]; then
  DEVICE=cpu; PIPELINE_CONFIG=random-small; DTYPES="float32"; SAM=tiny; PRECISION=fp32
  REPEATS=2; WARMUP=1; ANSWER_REPEATS=1; STEP_LIMIT=300
else
  DEVICE=cuda; PIPELINE_CONFIG=llava15-7b; DTYPES="float16 bfloat16"; SAM=vit_l; PRECISION=fp16
  REPEATS=10; WARMUP=2; ANSWER_REPEATS=3; STEP_LIMIT=170
fi
START=$(date +%s)
FAILED=0
: > "$OUT/steps.tsv"

# step NAME LIMIT_S COMMAND...: runs COMMAND with its output in $OUT/NAME.txt, records status and seconds.
step() {
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "== $name: $*" | tee -a "$OUT/log.txt"
  timeout --signal=INT --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  rc=$?
  local status=ok
  if [ "$rc" -eq 124 ]; then status="timed out after ${limit} s"; elif [ "$rc" -ne 0 ]; then status="failed (exit $rc)"; fi
  if [ "$rc" -ne 0 ] && [ "$FAILED" -eq 0 ]; then FAILED=$rc; fi
  printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$OUT/steps.tsv"
  echo "   $status in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/log.txt"
}

if [ -n "$WHEELS" ]; then
  step install_wheels 120 "$PYTHON" -m pip install --no-index --no-deps "$WHEELS"/*.whl
fi

step environment 60 "$PYTHON" - <<'EOF'
import importlib, platform, shutil, subprocess
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only", "|",
      torch.get_num_threads(), "CPU threads")
for name in ("transformers", "tokenizers", "segment_anything", "torchvision", "onnx", "onnxruntime", "torchao",
             "accelerate", "tensorrt"):
    try:
        print(f"{name}: {getattr(importlib.import_module(name), '__version__', 'installed')}")
    except Exception as e:   # noqa: BLE001 - a missing package is reported, not fatal here
        print(f"{name}: MISSING ({type(e).__name__}: {e})")
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                          "--format=csv"], capture_output=True, text=True).stdout)
EOF

for dtype in $DTYPES; do
  step "pipeline_${PIPELINE_CONFIG}_${dtype}" "$STEP_LIMIT" "$PYTHON" bench/pipeline.py --config "$PIPELINE_CONFIG" \
    --device "$DEVICE" --dtype "$dtype" --repeats "$REPEATS" --warmup "$WARMUP" --answer-repeats "$ANSWER_REPEATS" \
    --json "$OUT/pipeline_${PIPELINE_CONFIG}_${dtype}.json"
done
step "refiner_${SAM}_${PRECISION}" 120 "$PYTHON" bench/refiner.py --sam-type "$SAM" --device "$DEVICE" \
  --precision "$PRECISION" --repeats "$REPEATS" --cache-dir "$OUT/engine_cache"
step "tracking_${PIPELINE_CONFIG}" "$STEP_LIMIT" "$PYTHON" bench/tracking.py --config "$PIPELINE_CONFIG" \
  --device "$DEVICE" --objects 1,2 --threads 1 --repeats "$REPEATS" --warmup "$WARMUP" \
  --json "$OUT/tracking_${PIPELINE_CONFIG}.json"
step gpu_tests 180 "$PYTHON" -m pytest -q -rs tests/test_gpu.py tests/test_sam_tensorrt.py \
  --junitxml="$OUT/gpu_tests.xml" -p no:cacheprovider

{
  echo "# GPU check ($MODE), $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START )) s"
  echo
  grep -E '^(device|python)' "$OUT/environment.txt"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}' "$OUT/steps.tsv"
  for f in "$OUT"/pipeline_*.txt "$OUT"/refiner_*.txt "$OUT"/tracking_*.txt "$OUT"/gpu_tests.txt; do
    [ -f "$f" ] || continue
    echo
    echo "## $(basename "$f" .txt)"
    echo '```'
    grep -vE '^(Loading weights|Writing model)' "$f" | tail -n 60
    echo '```'
  done
} > "$OUT/SUMMARY.md"
echo "wrote $OUT/SUMMARY.md ($(( $(date +%s) - START )) s)"
exit "$FAILED"
