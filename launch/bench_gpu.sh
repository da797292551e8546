#!/usr/bin/env bash
# The speed comparison on one GPU: the PyTorch anchor, then dpt-jax, same shapes and batch, one run.
#
# Run from the repo root on the GPU machine (nothing is installed there but the carried wheels):
#   .bench/  a copy of shared/bench/ (torch_dpt_reference.py)
#   .whl/    wheels of what the machine lacks: diffusers (the anchor), ml_collections (dpt-jax)
# Results under $OUT: bench.jsonl (the JSON lines of both implementations, from their stdout),
# bench.log (their stderr: warnings, errors; its tail is printed when a command fails).
#
#   bash launch/bench_gpu.sh                       # the stage-2 tune step, batch 4, 3 timed runs
#   WHAT=tune,probe BATCH=4 ITERS=3 BUDGET_S=540 bash launch/bench_gpu.sh
#
# The whole script stays within BUDGET_S seconds (default 300): the anchor gets at most TORCH_S
# (default 90), dpt-jax what is left. Compiling the stage-2 step at SD-2.1 shapes takes ~150 s on
# an H200, so by default only that step is measured.
set -uo pipefail

WHAT=${WHAT:-tune}
BATCH=${BATCH:-4}
ITERS=${ITERS:-3}
BUDGET_S=${BUDGET_S:-300}
TORCH_S=${TORCH_S:-90}
EXTRA_ARGS=${EXTRA_ARGS:-}   # given to both, e.g. --tiny (a smoke test of this script on a CPU)
OUT=${OUT:-/tmp/bench_out}
SITE=${SITE:-/tmp/site}       # where the carried wheels are unpacked
start=$SECONDS
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Fail now, not after the anchor, when a module is missing (found, not imported: no seconds spent).
python3 -c "import importlib.util as u, sys
missing = [m for m in ('diffusers', 'peft', 'ml_collections', 'flax', 'optax', 'orbax', 'dpt_jax') if not u.find_spec(m)]
sys.exit(f'missing modules: {missing} (carry their wheels in .whl/)' if missing else 0)" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# One command within a time limit: its stdout (JSON lines) to the terminal and bench.jsonl,
# its stderr to bench.log.
measure() {
    local limit=$1; shift
    echo "== $* (limit ${limit}s, $((SECONDS - start))s spent)"
    timeout --kill-after=5 "$limit" "$@" 2>>"$OUT/bench.log" | tee -a "$OUT/bench.jsonl"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "== exit $rc$([ "$rc" -eq 124 ] && echo " (timed out after ${limit}s)"): $*"
        tail -n 25 "$OUT/bench.log"
    fi
    return "$rc"
}

read -r -a extra <<< "$EXTRA_ARGS"
measure "$TORCH_S" python3 .bench/torch_dpt_reference.py --what "$WHAT" --batch "$BATCH" --iters "$ITERS" --warmup 1 ${extra[@]+"${extra[@]}"}
left=$((BUDGET_S - (SECONDS - start) - 5))
measure "$left" python3 -m dpt_jax.bench --what "$WHAT" --batch "$BATCH" --iters "$ITERS" ${extra[@]+"${extra[@]}"}
rc=$?
echo "== done in $((SECONDS - start))s"
exit "$rc"
