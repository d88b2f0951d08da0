#!/usr/bin/env bash
# Train demo weights from synthetic CTPA phantoms: every step of the model card (models/README.md), timed.
#
#   training/demo.sh [WORK]        (WORK: where data, caches, runs and the report go; default runs/demo)
#
# Environment: CONFIG (training/configs/demo.yaml), OUT (WORK/pe-demo.pt; OUT=models/pe-demo.pt replaces the
# shipped weights), STUDIES (stage-1 training phantoms, 1000), STAGE1_SEED (their seed, 0), STAGE2_STUDIES (stage-2
# training phantoms, 800), TEST_STUDIES (held-out phantoms, 400), WORKERS (phantom-writing processes, 2), INIT (a
# trained stage 1, a best.pt or a pe-node checkpoint, that stage 1 fine-tunes instead of starting from the config's
# backbone weights; none by default), STAGE1_CHECKPOINT (the stage-1 checkpoint that features, evaluate and export
# take: best.pt, the default, or last.pt), STAGE1_OPTIONS (more options for `pe-train stage1`, on one line, split at
# spaces with no quoting, e.g. "--set stage1.epochs=5 --set stage1.max_minutes=null" to train the epochs a time
# budget gave on another machine; --init goes in INIT), AVERAGE (stage-1 checkpoints, split at spaces, that
# `pe-train average` averages with this run's best.pt and last.pt, in that order; features, evaluate and export then
# take the average, WORK/average/best.pt; none by default), PE_TRAIN (the pe-train command).
# Stage 2 learns from the embeddings of studies stage 1 never saw (a second phantom set, seed 3): on the embeddings
# of stage 1's own training studies it learns how stage 1 behaves on studies it was fitted to, not on new ones.
# The shipped weights started from `CONFIG=training/configs/demo-gpu.yaml WORKERS=16` on one GPU (about nine
# minutes of stage 1 and data on an H200); demo.yaml, the default, is the same recipe with the time budget of two
# CPU cores (about 100 minutes from nothing, weaker weights). A CUDA GPU is used when present (device: auto). The
# same commands train on the real RSNA-STR data set: point `prepare --data` at it instead of the phantoms and raise
# the sizes in the config.
# The stage 1 shipped now is the mean of five checkpoints of the last three of five fine-tunings of that GPU stage 1
# on two CPU cores; from the file shipped before (commit fe734df), the last fine-tuning, the mean and all after it are
#   git show fe734df:models/pe-demo.pt > pe-demo-before.pt
#   CONFIG=training/configs/finetune-cpu.yaml INIT=pe-demo-before.pt STUDIES=1000 STAGE1_SEED=10 \
#   STAGE1_OPTIONS="--set stage1.epochs=6 --set stage1.max_minutes=null" \
#   AVERAGE="runs/finetune3/stage1/best.pt runs/finetune4/stage1/best.pt runs/finetune4/stage1/last.pt" \
#   training/demo.sh runs/finetune5
# (about 110 minutes on the two bf16 cores that ran it; the third and fourth fine-tunings' runs come first, and
# models/README.md has their commands and the earlier ones).
set -euo pipefail

WORK=${1:-runs/demo}
CONFIG=${CONFIG:-training/configs/demo.yaml}
OUT=${OUT:-$WORK/pe-demo.pt}
PE_TRAIN=${PE_TRAIN:-pe-train}
STUDIES=${STUDIES:-1000}
STAGE1_SEED=${STAGE1_SEED:-0}
STAGE2_STUDIES=${STAGE2_STUDIES:-800}
TEST_STUDIES=${TEST_STUDIES:-400}
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
        step "$name" "$PE_TRAIN" phantoms --out "$out" "$@"
    fi
}

phantoms phantoms-train "$WORK/phantoms-train" --studies "$STUDIES" --seed "$STAGE1_SEED" --size 256 \
    --slices 60-120 --workers "$WORKERS" --quiet
phantoms phantoms-stage2 "$WORK/phantoms-stage2" --studies "$STAGE2_STUDIES" --seed 3 --size 256 \
    --slices 60-120 --workers "$WORKERS" --quiet
phantoms phantoms-test "$WORK/phantoms-test" --studies "$TEST_STUDIES" --seed 1 --size 256 \
    --slices 60-120 --workers "$WORKERS" --quiet
step prepare-train "$PE_TRAIN" prepare --config "$CONFIG" --data "$WORK/phantoms-train" --cache "$WORK/cache-train"
step prepare-stage2 "$PE_TRAIN" prepare --config "$CONFIG" --data "$WORK/phantoms-stage2" \
    --cache "$WORK/cache-stage2"
step prepare-test "$PE_TRAIN" prepare --config "$CONFIG" --data "$WORK/phantoms-test" --cache "$WORK/cache-test" \
    --split-all test
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
step features-stage2 "$PE_TRAIN" features --config "$CONFIG" --stage1 "$STAGE1" \
    --cache "$WORK/cache-stage2" --out "$WORK/features-stage2"
step features-test "$PE_TRAIN" features --config "$CONFIG" --stage1 "$STAGE1" \
    --cache "$WORK/cache-test" --out "$WORK/features-test"
step stage2-attention "$PE_TRAIN" stage2 --config "$CONFIG" --features "$WORK/features-stage2" \
    --out "$WORK/stage2-attention"
step stage2-mean "$PE_TRAIN" stage2 --config "$CONFIG" --features "$WORK/features-stage2" --out "$WORK/stage2-mean" \
    --pooling mean
step evaluate "$PE_TRAIN" evaluate --config "$CONFIG" --features "$WORK/features-test" \
    --stage1 "$STAGE1" --stage2 "$WORK/stage2-attention/best.pt" \
    --baseline "$WORK/stage2-mean/best.pt" --out "$WORK/report"
step export "$PE_TRAIN" export --stage1 "$STAGE1" --stage2 "$WORK/stage2-attention/best.pt" \
    --out "$OUT" --evaluation "$WORK/report/metrics.json" \
    --description "pe-node demo weights: trained on synthetic CTPA phantoms (training/demo.sh); for demonstration only, not for clinical use"
echo "total $SECONDS s" | tee -a "$TIMES" >&2
