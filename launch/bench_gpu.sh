#!/usr/bin/env bash
# The speed comparison on one GPU: the PyTorch anchor, then dpt-jax, same shapes and batch, one run.
#
# Run from the repo root on the GPU machine (nothing is installed there but the carried wheels):
#   .bench/  a copy of shared/bench/ (torch_dpt_reference.py)
#   .whl/    wheels of what the machine lacks: diffusers (the anchor) and ml_collections (dpt-jax)
# Results: $OUT/bench.jsonl (one JSON line per measurement, both implementations), $OUT/bench.log.
#
#   bash launch/bench_gpu.sh                       # the stage-2 tune step, batch 4
#   WHAT=tune,probe BATCH=4 BUDGET_S=540 bash launch/bench_gpu.sh
#
# The whole script stays within BUDGET_S seconds (default 300): the anchor gets at most TORCH_S
# (default 90), dpt-jax what is left. Compiling the stage-2 step at SD-2.1 shapes takes ~150 s on an
# H200, so the default measures only that step. XLA's compilations persist in $DPT_JAX_XLA_CACHE:
# a second run on the same machine skips them (its compile_s is then the cache's load time).
set -uo pipefail

WHAT=${WHAT:-tune}
BATCH=${BATCH:-4}
ITERS=${ITERS:-3}
BUDGET_S=${BUDGET_S:-300}
TORCH_S=${TORCH_S:-90}
OUT=${OUT:-/tmp/bench_out}
start=$SECONDS
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export DPT_JAX_XLA_CACHE=${DPT_JAX_XLA_CACHE:-/tmp/dpt_jax_xla}
# Fail in seconds, not after the anchor, when a module is missing.
python3 -c "import diffusers, peft, ml_collections, flax, optax, orbax.checkpoint, dpt_jax.bench" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# One measurement command within a time limit: everything to the log and the terminal, JSON lines
# also to bench.jsonl.
measure() {
    local limit=$1; shift
    echo "== $* (limit ${limit}s, $((SECONDS - start))s spent)"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$OUT/bench.log" >(grep --line-buffered '^{' >>"$OUT/bench.jsonl")
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 124 ] && echo "== timed out after ${limit}s: $*"
    return "$rc"
}

measure "$TORCH_S" python3 .bench/torch_dpt_reference.py --what "$WHAT" --batch "$BATCH" --iters "$ITERS" --warmup 1
left=$((BUDGET_S - (SECONDS - start) - 5))
# The CLI entry point: the same program as `python -m dpt_jax.bench`, with the compilation cache.
measure "$left" python3 -m dpt_jax.cli bench --what "$WHAT" --batch "$BATCH" --iters "$ITERS"
rc=$?
echo "== done in $((SECONDS - start))s"
cat "$OUT/bench.jsonl"
exit "$rc"
