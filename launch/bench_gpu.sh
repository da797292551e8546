#!/usr/bin/env bash
# The speed comparison on one GPU: the PyTorch anchor, then dpt-jax, same shapes and batch, one run.
#
# Run from the repo root on the GPU machine (nothing is installed there but the carried wheels):
#   .bench/  a copy of shared/bench/ (torch_dpt_reference.py)
#   .whl/    wheels of what the machine lacks: diffusers (the anchor), ml_collections (dpt-jax)
# both made beforehand on a machine with a package index (they are ignored by git):
#   mkdir -p .bench && cp ../shared/bench/*.py .bench/
#   pip download --no-deps -d .whl diffusers==0.42.1 ml_collections importlib_metadata
# Results under $OUT: bench.jsonl (the JSON lines of both implementations, from their stdout),
# bench.log (their stderr: warnings, errors; its tail is printed when a command fails) and, unless
# PROFILE=0, profile.tar.* (split in 15 MiB parts): per dpt-jax measurement its profiler trace and
# optimised HLO; bench.jsonl has its summary (a "profile" line: where the device time goes).
# Put the parts together with `cat profile.tar.* | tar x`; `python -m dpt_jax.profiling` reads them.
#
# The measurements (the arguments, or PLAN when none are given) are what:batch:anchor items, each
# run by the anchor (torch eager or torch.compile) and then by dpt-jax, so that every finished pair
# is a ratio from the same run (anchor none: dpt-jax alone, e.g. to compare its variants on a warm
# machine); attention:batch times dpt-jax's attention kernel alone at the U-Net's shapes (cuDNN,
# XLA, Pallas), no anchor.
# The default is the issue's table: the tune step against eager (torch.compile does not finish),
# the probe step and sampling (eta 0 and 0.5) against torch.compile.
#
#   bash launch/bench_gpu.sh                                    # the whole table
#   ITERS=3 BUDGET_S=560 bash launch/bench_gpu.sh tune:4:eager sample:8:compile
#   BUDGET_S=300 bash launch/bench_gpu.sh attention:16 probe:8:compile
#   ATTENTION=pallas_mgpu bash launch/bench_gpu.sh tune:4:eager  # dpt-jax with Pallas self-attention
#   TRITON_GEMM=1 PROFILE=0 bash launch/bench_gpu.sh tune:4:none  # dpt-jax with XLA's Triton matmuls
#   JAX_ARGS="--steps-per-call 4" bash launch/bench_gpu.sh tune:4:none  # 4 train steps per compiled call
#   XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP bash launch/bench_gpu.sh tune:4:none
#                                  # an XLA variant: dpt-jax's lines record the caller's flags (xla_flags)
#   AUTOTUNE_CACHE=/tmp/autotune JAX_ARGS="--profile-runs 2" bash launch/bench_gpu.sh tune:4:none
#                                  # variants after the first skip its autotuning; 2 calls traced
#
# The whole script stays within BUDGET_S seconds (default 540): each anchor command gets at most
# TORCH_S (default 300), each dpt-jax command what is left. Seen on an H100 (2026-11-26): the
# eager tune anchor ~40 s, dpt-jax's tune step 131 s to compile; torch.compile's sampling needed
# more than 170 s for eta 0 and 0.5 together; dpt-jax's sampling compiled in 20 s + 64 s.
set -uo pipefail

PLAN=${*:-${PLAN:-tune:4:eager probe:8:compile sample:8:compile}}
ITERS=${ITERS:-3}
BUDGET_S=${BUDGET_S:-540}
TORCH_S=${TORCH_S:-300}
ATTENTION=${ATTENTION:-auto} # dpt-jax's --attention-implementation (pallas_mgpu: Pallas self-attention)
TRITON_GEMM=${TRITON_GEMM:-0} # 1: dpt-jax's --triton-gemm (XLA's Triton matmuls, off by default)
EXTRA_ARGS=${EXTRA_ARGS:-}   # given to both, e.g. --tiny (a smoke test of this script on a CPU)
JAX_ARGS=${JAX_ARGS:-}       # given to dpt-jax's train and sampling measurements only
PROFILE=${PROFILE:-1}        # 0: no profile of the dpt-jax measurements
# A directory: dpt-jax's compiles share XLA's autotuning results through it, so that a later
# variant of the same step skips timing the kernels an earlier one chose (its compile_s is then
# shorter than a cold compile's; the kernels are the same choices).
AUTOTUNE_CACHE=${AUTOTUNE_CACHE:-}
OUT=${OUT:-/tmp/bench_out}
SITE=${SITE:-/tmp/site}       # where the carried wheels are unpacked
start=$SECONDS
for item in $PLAN; do  # a typo fails now, not after minutes of measuring
    if ! [[ "$item" =~ ^(tune|probe|sample):[1-9][0-9]*:(eager|compile|none)$|^attention:[1-9][0-9]*$ ]]; then
        echo "measurement '$item': expected what:batch:anchor (what in tune|probe|sample, anchor eager|compile|none)" \
             "or attention:batch" >&2
        exit 2
    fi
done
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/*.whl || exit 1
export PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Fail now, not after the anchor, when a module is missing (found, not imported: no seconds spent).
python3 -c "import importlib.util as u, sys
missing = [m for m in ('diffusers', 'peft', 'ml_collections', 'flax', 'optax', 'orbax', 'dpt_jax') if not u.find_spec(m)]
sys.exit(f'missing modules: {missing} (carry their wheels in .whl/)' if missing else 0)" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"

# One command within a time limit: its stdout (JSON lines) to the terminal and bench.jsonl,
# its stderr to bench.log.
measure() {
    local limit=$1; shift
    if [ "$limit" -le 10 ]; then
        echo "== skipped, budget spent: $*"
        return 124
    fi
    echo "== $* (limit ${limit}s, $((SECONDS - start))s spent)"
    timeout --kill-after=5 "$limit" "$@" 2>>"$OUT/bench.log" | tee -a "$OUT/bench.jsonl"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        echo "== exit $rc$([ "$rc" -eq 124 ] && echo " (timed out after ${limit}s)"): $*"
        tail -n 25 "$OUT/bench.log"
    fi
    return "$rc"
}

left() { echo $((BUDGET_S - (SECONDS - start) - 5)); }

read -r -a extra <<< "$EXTRA_ARGS"
read -r -a jax_args <<< "$JAX_ARGS"
profile=()
[ "$PROFILE" = 1 ] && profile=(--profile "$OUT/profile")
triton=()
[ "$TRITON_GEMM" = 1 ] && triton=(--triton-gemm)
jax_env=()
if [ -n "$AUTOTUNE_CACHE" ]; then
    mkdir -p "$AUTOTUNE_CACHE"
    jax_env=(env "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_per_fusion_autotune_cache_dir=$AUTOTUNE_CACHE")
fi
status=0
for item in $PLAN; do
    IFS=: read -r what batch anchor <<< "$item"
    if [ "$what" = attention ]; then
        measure "$(left)" python3 -m dpt_jax.bench --what attention --batch "$batch" ${extra[@]+"${extra[@]}"} || status=1
        continue
    fi
    if [ "$anchor" != none ]; then
        compile=()
        [ "$anchor" = compile ] && compile=(--compile)
        limit=$(left); [ "$limit" -gt "$TORCH_S" ] && limit=$TORCH_S
        measure "$limit" python3 .bench/torch_dpt_reference.py --what "$what" --batch "$batch" --iters "$ITERS" \
            --warmup 1 ${compile[@]+"${compile[@]}"} ${extra[@]+"${extra[@]}"} || status=1
    fi
    measure "$(left)" ${jax_env[@]+"${jax_env[@]}"} python3 -m dpt_jax.bench --what "$what" --batch "$batch" --iters "$ITERS" \
        --attention-implementation "$ATTENTION" ${triton[@]+"${triton[@]}"} ${jax_args[@]+"${jax_args[@]}"} \
        ${extra[@]+"${extra[@]}"} ${profile[@]+"${profile[@]}"} || status=1
done
# The device tool brings back at most 8 files of 16 MiB: one archive in parts, not a file per trace.
if [ -d "$OUT/profile" ]; then
    tar -C "$OUT" -cf - profile | split -b 15m - "$OUT/profile.tar." && rm -r "$OUT/profile"
    ls -l "$OUT"/profile.tar.*
fi
# dpt-jax falls back to XLA's attention where cuDNN's kernel does not compile: say where.
grep -h "cuDNN attention does not compile" "$OUT/bench.log" | sort | uniq -c
echo "== done in $((SECONDS - start))s"
exit "$status"
