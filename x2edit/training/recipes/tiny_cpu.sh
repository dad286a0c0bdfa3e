#!/usr/bin/env bash
# x2edit-tiny release 5 in one command on 2 CPU cores (about 2 hours), resumable:
#   stage 1  the editing base: the whole transformer trained to edit in one step from the source
#            (configs/x2edit_tiny/edit_base.yaml, 80 min budget);
#   stage 2  X2Edit's task-aware MoE-LoRA with the contrastive loss on that frozen base
#            (configs/x2edit_tiny/adapter_on_edit_base.yaml, 25 min budget);
#   then the bundle (with the MLP task router), `x2edit eval` with label and classifier routing (20 pairs
#   per task), the demo grid and report.json / report.md.
#
#   nohup bash x2edit/training/recipes/tiny_cpu.sh OUT >> OUT.log 2>&1 &
#   bash x2edit/training/recipes/tiny_cpu.sh OUT --smoke      # every stage for a few steps (~2 min; CI)
#
# If it stops (a session ends under it), run the same command again: finished stages are skipped, and a
# training stage resumes from its last checkpoint (every ~4 min) with what is left of its time budget.
# OUT gets x2edit-tiny/ (the bundle; copy it over x2edit/models/x2edit-tiny to ship it), report.json/.md,
# demo.png, eval_grid.png, log.txt; OUT/work/ holds the stages' own folders. Environment: BASE (the
# text-to-image transformer stage 1 starts from, default x2edit-tiny: release 3's, as release 5 was
# made), BASE_S / ADAPTER_S (stage budgets in seconds, default 4800 and 1500), CHANGE_FLOOR (the
# bundle's, default 0.04), PYTHON.
set -euo pipefail

OUT=${1:?usage: tiny_cpu.sh OUT [--smoke]}
SMOKE=${2:-}
mkdir -p "$OUT/work"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../../.."  # the repository root, where configs/ is
PY=${PYTHON:-python}
BASE=${BASE:-x2edit-tiny}
BASE_S=${BASE_S:-4800}
ADAPTER_S=${ADAPTER_S:-1500}
CHANGE_FLOOR=${CHANGE_FLOOR:-0.04}
CFG=configs/x2edit_tiny
WORK=$OUT/work
LOG="$OUT/log.txt"

SMALL=()
EVAL_N=20
DEMO_N=4
CLASSIFIER=6000
if [ "$SMOKE" = --smoke ]; then
    SMALL=(steps=2 batch_size=4 log_every=1 checkpoint_every=1 validate_every=0 optim.warmup_steps=0
           optim.decay_steps=1)
    EVAL_N=1
    DEMO_N=1
    CLASSIFIER=200
elif [ -n "$SMOKE" ]; then
    echo "tiny_cpu.sh: unknown option $SMOKE (expected --smoke)" >&2
    exit 2
fi

stage() {  # stage NAME DONE COMMAND...: run it unless DONE exists; log it; add its wall time
    local name=$1 done=$2 start=$SECONDS
    shift 2
    if [ -e "$done" ]; then
        echo "== $name: done before ($done)" | tee -a "$LOG"
        return
    fi
    echo "== $name: $*" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG"
    echo "$name $((SECONDS - start))" >> "$WORK/times.txt"
}

resume() {  # resume RUN_DIR: the train option that continues a stage stopped part-way, if it was
    if compgen -G "$1/checkpoints/step_*[0-9]" > /dev/null; then echo "--resume latest"; fi
}

touch "$WORK/times.txt"
# shellcheck disable=SC2046  # resume's word splitting is intended
stage base "$WORK/base/pipeline" $PY -m x2edit.cli train --config $CFG/edit_base.yaml output_dir="$WORK/base" \
    model.base="$BASE" time_budget_s=$BASE_S ${SMALL[@]+"${SMALL[@]}"} $(resume "$WORK/base")
# shellcheck disable=SC2046
stage adapter "$WORK/adapter/adapter.safetensors" $PY -m x2edit.cli train --config $CFG/adapter_on_edit_base.yaml \
    output_dir="$WORK/adapter" model.base="$WORK/base/pipeline" time_budget_s=$ADAPTER_S ${SMALL[@]+"${SMALL[@]}"} \
    $(resume "$WORK/adapter")
stage bundle "$WORK/x2edit-tiny" $PY -m x2edit.training.bundle --base "$WORK/base/pipeline" \
    --adapter "$WORK/adapter/adapter.safetensors" --out "$WORK/x2edit-tiny" --classifier-samples $CLASSIFIER \
    --change-floor "$CHANGE_FLOOR"
stage eval "$WORK/eval_labels/metrics.json" $PY -m x2edit.cli eval --base "$WORK/x2edit-tiny" --n-per-task $EVAL_N \
    --out "$WORK/eval_labels"
stage eval_classifier "$WORK/eval_classifier/metrics.json" $PY -m x2edit.cli eval --base "$WORK/x2edit-tiny" \
    --n-per-task $EVAL_N --routing classifier --out "$WORK/eval_classifier"
stage demo "$WORK/demo/metrics.json" $PY -m x2edit.cli demo --base "$WORK/x2edit-tiny" --n-per-task $DEMO_N \
    --out "$WORK/demo"

rm -rf "$OUT/x2edit-tiny"
cp -r "$WORK/x2edit-tiny" "$OUT/x2edit-tiny"
cp "$WORK/demo/demo.png" "$OUT/demo.png"
cp "$WORK/eval_labels/grid.png" "$OUT/eval_grid.png"
$PY -m x2edit.training.recipes.report "$WORK" "$OUT" --adapter-config "$CFG/adapter_on_edit_base.yaml" 2>&1 \
    | tee -a "$LOG"
