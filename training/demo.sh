#!/usr/bin/env bash
# Train demo weights from synthetic CTPA phantoms and evaluate them on both phantom families, every step timed.
#
#   training/demo.sh [WORK]        (WORK: where data, caches, runs and the report go; default runs/demo)
#
# With a trained stage 1 to start from, it fine-tunes that on two CPU cores (models/README.md, "The recipe for new
# weights", gives what that made from the shipped weights):
#   cp models/pe-demo.pt start.pt
#   CONFIG=training/configs/finetune-cpu.yaml INIT=start.pt training/demo.sh runs/finetune
# Without INIT, stage 1 trains from the config's backbone weights (demo.yaml: random weights on two CPU cores, far
# weaker weights; demo-gpu.yaml with WORKERS=16 on one CUDA GPU). OUT=models/pe-demo.pt replaces the shipped weights:
# do so only when the new ones are better on the independent family.
#
# Environment: CONFIG (training/configs/demo.yaml), OUT (WORK/pe-demo.pt), STUDIES (stage-1 phantoms, 600), STAGE1_SEED
# (their seed, 11), STAGE1_SLICES (their slice counts, 40-90), STAGE2_STUDIES (stage-2 phantoms, seed 3, 320),
# TEST_STUDIES (held-out phantoms of the training family, seed 1, 280), SLICES (the slice counts of those two sets,
# 40-120), INDEPENDENT_STUDIES (the evaluation-only family, seed 2027, 72), WORKERS (phantom-writing processes, 2), INIT
# (a trained stage 1, a best.pt or a pe-node checkpoint, that stage 1 fine-tunes; none by default), STAGE1_CHECKPOINT
# (the stage-1 checkpoint that features, evaluate and export take: best.pt, the default, or last.pt), STAGE1_OPTIONS
# (more options for `pe-train stage1`, on one line, split at spaces with no quoting, e.g. "--set stage1.epochs=5 --set
# stage1.max_minutes=null" to train the epochs a time budget gave on another machine; --init goes in INIT), AVERAGE
# (stage-1 checkpoints, split at spaces, that `pe-train average` averages with this run's best.pt and last.pt; features,
# evaluate and export then take the average, WORK/average/best.pt; none by default), PE_TRAIN (the pe-train command).
# Stage 2 learns from the embeddings of studies stage 1 never saw (a second phantom set): on stage 1's own training
# studies it would learn how stage 1 behaves on studies it was fitted to, not on new ones. The independent family is
# only evaluated: nothing is trained, selected or thresholded on it. A CUDA GPU is used when present (device: auto).
# The same commands train on the real RSNA-STR data set: point `prepare --data` at it instead of the phantoms.
set -euo pipefail

WORK=${1:-runs/demo}
CONFIG=${CONFIG:-training/configs/demo.yaml}
OUT=${OUT:-$WORK/pe-demo.pt}
PE_TRAIN=${PE_TRAIN:-pe-train}
STUDIES=${STUDIES:-600}
STAGE1_SEED=${STAGE1_SEED:-11}
STAGE1_SLICES=${STAGE1_SLICES:-40-90}
STAGE2_STUDIES=${STAGE2_STUDIES:-320}
TEST_STUDIES=${TEST_STUDIES:-280}
SLICES=${SLICES:-40-120}
INDEPENDENT_STUDIES=${INDEPENDENT_STUDIES:-72}
WORKERS=${WORKERS:-2}
INIT=${INIT:-}
read -r -a stage1_options <<<"${STAGE1_OPTIONS:-}"
read -r -a average <<<"${AVERAGE:-}"
STAGE1_CHECKPOINT=${STAGE1_CHECKPOINT:-best.pt}
case $STAGE1_CHECKPOINT in
    best.pt | last.pt) ;;
    *) echo "STAGE1_CHECKPOINT must be best.pt or last.pt, not '$STAGE1_CHECKPOINT'" >&2; exit 2 ;;
esac
for option in ${stage1_options[@]+"${stage1_options[@]}"}; do
    case $option in
        --init | --init=*) echo "STAGE1_OPTIONS: give the starting weights as INIT, not $option" >&2; exit 2 ;;
    esac
done
if [ -n "$INIT" ] && [ ! -f "$INIT" ]; then
    echo "INIT: no such file: $INIT" >&2
    exit 2
fi
for checkpoint in ${average[@]+"${average[@]}"}; do
    if [ ! -f "$checkpoint" ]; then
        echo "AVERAGE: no such file: $checkpoint" >&2
        exit 2
    fi
done
mkdir -p "$WORK"
TIMES="$WORK/timings.txt"
: >"$TIMES"

step() {
    local name=$1
    shift
    local start=$SECONDS
    echo "== $name: $*" >&2
    "$@"
    echo "$name $((SECONDS - start)) s" | tee -a "$TIMES" >&2
}

# A rerun in the same WORK keeps phantom sets already written (generation is deterministic for a seed), resumes
# prepare, and retrains from there.
phantoms() {
    local name=$1 out=$2
    shift 2
    if [ -f "$out/train.csv" ]; then
        echo "== $name: $out already written" >&2
    else
        step "$name" "$PE_TRAIN" phantoms --out "$out" --workers "$WORKERS" --quiet "$@"
    fi
}

phantoms phantoms-train "$WORK/phantoms-train" --studies "$STUDIES" --seed "$STAGE1_SEED" --slices "$STAGE1_SLICES"
phantoms phantoms-stage2 "$WORK/phantoms-stage2" --studies "$STAGE2_STUDIES" --seed 3 --slices "$SLICES"
phantoms phantoms-test "$WORK/phantoms-test" --studies "$TEST_STUDIES" --seed 1 --slices "$SLICES"
phantoms phantoms-independent "$WORK/phantoms-independent" --studies "$INDEPENDENT_STUDIES" --seed 2027 \
    --family independent
step prepare-train "$PE_TRAIN" prepare --config "$CONFIG" --data "$WORK/phantoms-train" --cache "$WORK/cache-train"
step prepare-stage2 "$PE_TRAIN" prepare --config "$CONFIG" --data "$WORK/phantoms-stage2" \
    --cache "$WORK/cache-stage2"
for held_out in test independent; do
    step "prepare-$held_out" "$PE_TRAIN" prepare --config "$CONFIG" --data "$WORK/phantoms-$held_out" \
        --cache "$WORK/cache-$held_out" --split-all test
done
if [ -n "$INIT" ]; then
    stage1_options+=(--init "$INIT")
fi
step stage1 "$PE_TRAIN" stage1 --config "$CONFIG" --cache "$WORK/cache-train" --out "$WORK/stage1" \
    ${stage1_options[@]+"${stage1_options[@]}"}
STAGE1="$WORK/stage1/$STAGE1_CHECKPOINT"
if [ ${#average[@]} -gt 0 ]; then
    step average "$PE_TRAIN" average --config "$CONFIG" --out "$WORK/average/best.pt" "${average[@]}" \
        "$WORK/stage1/best.pt" "$WORK/stage1/last.pt"
    STAGE1="$WORK/average/best.pt"
fi
for set in stage2 test independent; do
    step "features-$set" "$PE_TRAIN" features --config "$CONFIG" --stage1 "$STAGE1" --cache "$WORK/cache-$set" \
        --out "$WORK/features-$set"
done
step stage2-attention "$PE_TRAIN" stage2 --config "$CONFIG" --features "$WORK/features-stage2" \
    --out "$WORK/stage2-attention"
step stage2-mean "$PE_TRAIN" stage2 --config "$CONFIG" --features "$WORK/features-stage2" --out "$WORK/stage2-mean" \
    --pooling mean
step evaluate "$PE_TRAIN" evaluate --config "$CONFIG" --features "$WORK/features-test" \
    --independent "$WORK/features-independent" --stage1 "$STAGE1" --stage2 "$WORK/stage2-attention/best.pt" \
    --baseline "$WORK/stage2-mean/best.pt" --out "$WORK/report"
step export "$PE_TRAIN" export --stage1 "$STAGE1" --stage2 "$WORK/stage2-attention/best.pt" \
    --out "$OUT" --evaluation "$WORK/report/metrics.json" \
    --description "pe-node demo weights: trained on synthetic CTPA phantoms (training/demo.sh); for demonstration only, not for clinical use"
echo "total $SECONDS s" | tee -a "$TIMES" >&2
