#!/usr/bin/env bash
# The GPU check of the kernels (issue 16), in one run of at most 8 minutes on one H100 / H200:
#   1. env.txt                 GPU, driver, clocks, python / torch / triton / diffusers versions
#   2. tests.txt               pytest tests/kernels compiled on the GPU (fixed launch configurations)
#   3. kernels-quick.json/.md  the benchmark's quick mode: t2i tokens, three linears, every backend
#   4. kernels.json/.md        the full benchmark: the FLUX.1-dev forward end to end (t2i and edit:
#                              base, MoE-LoRA per backend, task adapter merged, fused q/k/v) first,
#                              then every linear at both token counts, then a training step
#      <gpu>.json              the dispatch table those measurements give  } copy both into
#      <gpu>-configs.json      the Triton launch configurations tuned      } x2edit/kernels/measured/
# Eight files at most, each far below 16 MB, in OUT_DIR.
#
# Usage: benchmarks/gpu_check.sh OUT_DIR [--quick]      (--quick: stages 1-3 only)
# Each stage runs under its own time limit inside a 470 s budget (GPU_CHECK_BUDGET); the benchmark
# stops starting measurements at its deadline and still writes what it has ("truncated" in the
# files). Exits with status 2, writing nothing, where no CUDA GPU is visible.
# The device machines have no package registry: diffusers (for the end-to-end forward) travels as a
# wheel in .whl/ (see docs/kernels.md, "Running the GPU check"); without it that part is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: benchmarks/gpu_check.sh OUT_DIR [--quick]" >&2
  exit 64
fi
OUT=$1
MODE=${2:-full}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-470}
START=$SECONDS

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "benchmarks/gpu_check.sh needs a CUDA GPU (compiled Triton kernels, cuBLAS, CUDA-event timing); torch sees" \
       "none here. Nothing was run or written. On CPU: python -m pytest tests/kernels (Triton's interpreter)." >&2
  exit 2
fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then  # carried wheels (diffusers and what it needs beyond the image)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

left() { echo $(( BUDGET - (SECONDS - START) )); }
limit() {  # the smaller of a stage's own limit and what is left of the budget
  local l; l=$(left); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"
}
stage() { echo "== $1 ($(( SECONDS - START )) s of ${BUDGET} s)"; }

stage "1/4 environment"
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
    --format=csv 2>&1
  "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda)
props = torch.cuda.get_device_properties(0)
print("gpu", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0),
      "| SMs", props.multi_processor_count, "| L2", getattr(props, "L2_cache_size", "?"))
for name in ("triton", "diffusers", "peft", "transformers", "xdist"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "installed"))
    except ImportError as exc:
        print(name, "MISSING:", exc)
from x2edit import kernels
from x2edit.kernels import dispatch
from x2edit.kernels.env import device_name
table = dispatch.gpu_table(device_name(torch.device("cuda")))
print("shipped dispatch table for this GPU:", "none (the rule)" if table is None else f"{len(table.rows)} rows")
EOF
  git rev-parse HEAD 2>/dev/null || echo "commit: (no git here)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage "2/4 compiled kernel tests"
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"  # compiling is CPU work: 8 workers share the GPU
T=$(limit 150)
timeout "$T" "$PY" -m pytest tests/kernels -q -p no:cacheprovider $XDIST --durations=10 > "$OUT/tests.txt" 2>&1
echo "exit status $? (124: stopped at ${T} s)" >> "$OUT/tests.txt"
tail -n 15 "$OUT/tests.txt"

stage "3/4 benchmark, quick mode"
T=$(limit 110)
timeout "$T" "$PY" benchmarks/lora_kernels.py --out "$OUT" --quick --no-e2e --deadline $(( T - 25 )) \
  || echo "quick benchmark: exit status $?"

if [ "$MODE" != "--quick" ]; then
  stage "4/4 benchmark, full (end to end first)"
  T=$(limit 240)
  timeout "$T" "$PY" benchmarks/lora_kernels.py --out "$OUT" --deadline $(( T - 40 )) \
    || echo "full benchmark: exit status $?"
fi

stage "done"
ls -l "$OUT"
for f in "$OUT"/kernels-quick.md "$OUT"/kernels.md; do
  [ -f "$f" ] || continue
  echo "--- $f: judged rows"
  grep -E "^\| (gemm r1|lora r64|moe-lora|multi-lora|train ).*\| (auto|triton|triton_tma|addmm|base) \|" "$f" | head -n 60
  sed -n '/Full FLUX.1-dev/,$p' "$f"
done
