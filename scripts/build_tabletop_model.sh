#!/usr/bin/env bash
# Rebuilds the embedded default model `tabletop-tiny` from scratch (SPEC.md §6), then evaluates it:
#   1. pre-train the tiny LLaVA on generated question-answer pairs (then it is frozen),
#   2. pre-train the tiny SAM on generated scenes (box, point and dense-mask prompts),   (1 and 2 run in parallel)
#   3. train F-LMM's grounding head (mask head + text projection + SAM prompt encoder/decoder) on the frozen LMM,
#   4. evaluate on 500 held-out scenes against an untrained-LMM head and a whole-image baseline; write the model card.
# Deterministic seeds; each step resumes from its checkpoint if interrupted. Work files go to out/tabletop_build/.
set -eo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
WORK=${WORK:-out/tabletop_build}
BUNDLE=ros_ws/src/flmm_ros/models/tabletop_tiny
mkdir -p "$WORK"
start=$(date +%s)

python -m flmm_ros.tabletop.train_lmm --out "$WORK/lmm" --steps 4000 --batch-size 12 --questions 8 --lr 1.5e-3 \
    --warmup 60 --eval-every 250 --eval-scenes 150 --threads 1 --probe-weight 1.0 > "$WORK/lmm.log" 2>&1 &
lmm_pid=$!
python -m flmm_ros.tabletop.train_sam --out "$WORK/sam" --steps 7000 --threads 1 > "$WORK/sam.log" 2>&1 &
sam_pid=$!
wait $lmm_pid
wait $sam_pid
echo "[build] LMM and SAM pre-trained after $(( $(date +%s) - start )) s"

python -m flmm_ros.grounding.training.train --lmm "$WORK/lmm/model" --sam-arch "$WORK/sam/sam_arch.yaml" \
    --sam-checkpoint "$WORK/sam/sam.safetensors" --mask-head-base 32 --data tabletop --train-count 800 \
    --val-count 40 --epochs 3 --batch-size 4 --lr 2e-4 --eval-every 100 --save-every 100 --threads 2 \
    --out "$WORK/head" --bundle-out "$BUNDLE"
echo "[build] grounding head trained after $(( $(date +%s) - start )) s"

python -m flmm_ros.tabletop.model_card --bundle "$BUNDLE" --work "$WORK" --count 500 \
    --build-seconds $(( $(date +%s) - start ))
