#!/usr/bin/env bash
# Rebuilds the embedded default model `tabletop-tiny` from scratch (SPEC.md §6), then evaluates it:
#   1. pre-train the tiny LLaVA on generated question-answer pairs (then it is frozen),
#   2. pre-train the tiny SAM on generated scenes (box, point, dense-mask and kind prompts), (1 and 2 in parallel)
#   3. train F-LMM's grounding head (mask head + text projection + SAM prompt encoder/decoder) on the frozen
#      LMM, and the same recipe on an untrained copy of the LMM (the control row),          (in parallel)
#   3b. go on training the head with plural phrases (instance scenes), fit the presence calibration (#18),
#   4. evaluate on 500 held-out scenes (+ whole-image baseline, LMM answer accuracy, absent targets, instances,
#      answer agreement); write the model card.
# One torch thread per job: on 2 cores, two jobs with more threads each slow each other down many times.
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

python -m flmm_ros.tabletop.model_card random-lmm --trained "$WORK/lmm/model" --out "$WORK/random_lmm"
HEAD_ARGS="--sam-arch $WORK/sam/sam_arch.yaml --sam-checkpoint $WORK/sam/sam.safetensors --mask-head-base 32
    --train-count 6000 --val-count 40 --epochs 2 --batch-size 4 --lr 5e-4 --eval-every 500
    --save-every 250 --threads 1"
python -m flmm_ros.tabletop.head_cli train --lmm "$WORK/lmm/model" $HEAD_ARGS --out "$WORK/head" \
    --bundle-out "$BUNDLE" > "$WORK/head.log" 2>&1 &
head_pid=$!
python -m flmm_ros.tabletop.head_cli train --lmm "$WORK/random_lmm" $HEAD_ARGS --out "$WORK/head_random_lmm" \
    --bundle-out "$WORK/random_lmm_bundle" > "$WORK/head_random_lmm.log" 2>&1 &
random_pid=$!
wait $head_pid
wait $random_pid
echo "[build] grounding heads trained after $(( $(date +%s) - start )) s"

# Plural phrases (#18): the head goes on with instance scenes (union targets) among ordinary ones, then the presence
# calibration is fitted on validation scenes and stored in the bundle.
python -m flmm_ros.tabletop.head_cli train --lmm "$BUNDLE" --sam-arch "$WORK/sam/sam_arch.yaml" --mask-head-base 32 \
    --train-count 4000 --group-count 1500 --val-count 40 --epochs 1 --batch-size 4 --lr 1e-4 --eval-every 250 \
    --save-every 100 --threads 1 --out "$WORK/head_plural" --bundle-out "$BUNDLE" > "$WORK/head_plural.log" 2>&1
python -m flmm_ros.tabletop.trust_eval calibrate --model "$BUNDLE" --split val --count 600 --write \
    > "$WORK/calibrate.log" 2>&1
echo "[build] plural phrases and presence calibration after $(( $(date +%s) - start )) s"

python -m flmm_ros.tabletop.trust_eval evaluate --model "$BUNDLE" --split test --count 500 --json "$WORK/trust.json" \
    > "$WORK/trust.log" 2>&1
python -m flmm_ros.tabletop.model_card card --bundle "$BUNDLE" --random-bundle "$WORK/random_lmm_bundle" \
    --work "$WORK" --count 500 --build-seconds $(( $(date +%s) - start )) --trust-json "$WORK/trust.json"
