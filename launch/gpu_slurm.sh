#!/usr/bin/env bash
# Submit a multi-node dpt-jax training run to Slurm: one process per node drives all its GPUs.
#
#   launch/gpu_slurm.sh [options] CONFIG WORKDIR [--config.key=value ...]
#   launch/gpu_slurm.sh --nodes 4 --gpus-per-node 8 --partition gpu --venv ~/dpt-jax/.venv \
#       configs/tune_sd21.py /shared/runs/tune_sd21 --config.pretrained=/shared/sd21
#
# srun starts one task per node; each sets DPT_COORDINATOR (first node of the job), DPT_NUM_PROCESSES
# and DPT_PROCESS_ID from Slurm's variables (read by dpt_jax/distributed.py). WORKDIR must be on a
# file system every node sees: all processes write the one orbax checkpoint there. Slurm sends
# SIGTERM --signal-before seconds before the time limit; the run checkpoints and stops, and with
# --requeue a preempted job starts again and resumes from that checkpoint (after a time limit,
# submit the same command again).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_slurm.sh [options] CONFIG WORKDIR [--config.key=value ...]

  -N, --nodes N             nodes (default 1)
  -G, --gpus-per-node G     GPUs per node (default 8)
  -p, --partition P         Slurm partition
  -A, --account A           Slurm account
  -t, --time T              time limit, e.g. 24:00:00 (default 24:00:00)
  -J, --job-name NAME       (default dpt-jax)
      --venv DIR            virtual environment to activate on every node (default: none, dpt-jax on PATH)
      --port P              coordinator port (default: 20000 + job id % 20000)
      --signal-before S     SIGTERM S seconds before the time limit (default 300)
      --requeue             requeue on preemption or node failure (resumes from the checkpoint)
      --logs DIR            Slurm output DIR/slurm-<job>.out (default WORKDIR/logs)
      --dry-run             print the batch script and the sbatch command, submit nothing
  -h, --help                this text
EOF
}

die() { echo "gpu_slurm.sh: $*" >&2; exit 2; }
is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

nodes=1 gpus=8 partition="" account="" time_limit="24:00:00" job_name="dpt-jax" venv="" port=""
signal_before=300 requeue=0 logs="" dry_run=0
positional=()
while (($#)); do
  case "$1" in
    -N|--nodes) nodes="${2:-}"; shift 2 || die "$1 needs a value" ;;
    -G|--gpus-per-node) gpus="${2:-}"; shift 2 || die "$1 needs a value" ;;
    -p|--partition) partition="${2:-}"; shift 2 || die "$1 needs a value" ;;
    -A|--account) account="${2:-}"; shift 2 || die "$1 needs a value" ;;
    -t|--time) time_limit="${2:-}"; shift 2 || die "$1 needs a value" ;;
    -J|--job-name) job_name="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --venv) venv="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --port) port="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --signal-before) signal_before="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --requeue) requeue=1; shift ;;
    --logs) logs="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --config.*) positional+=("$1"); shift ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) positional+=("$1"); shift ;;
  esac
done

((${#positional[@]} >= 2)) || { usage >&2; die "CONFIG and WORKDIR are required"; }
config="${positional[0]}" workdir="${positional[1]}"
overrides=("${positional[@]:2}")
for o in "${overrides[@]}"; do
  [[ "$o" == --config.* ]] || die "after CONFIG WORKDIR only --config.key=value overrides may follow, got '$o'"
done
[[ -f "$config" ]] || die "config file not found: $config"
is_count "$nodes" || die "--nodes must be a positive integer, got '$nodes'"
is_count "$gpus" || die "--gpus-per-node must be a positive integer, got '$gpus'"
is_count "$signal_before" || die "--signal-before must be a positive integer (seconds), got '$signal_before'"
[[ -z "$port" ]] || is_count "$port" || die "--port must be a port number, got '$port'"
[[ -z "$venv" || -f "$venv/bin/activate" ]] || die "--venv $venv has no bin/activate"
[[ "$workdir" != *://* ]] || die "WORKDIR must be a path on a shared file system, not a URL: $workdir"
if ((!dry_run)); then
  command -v sbatch >/dev/null 2>&1 || die "sbatch not found: run this on a Slurm login node (or use --dry-run)"
fi

# Absolute paths: the job starts in the submit directory, but other nodes may mount it elsewhere.
config="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
workdir="$(realpath -m "$workdir")"
logs="$(realpath -m "${logs:-$workdir/logs}")"
[[ -z "$venv" ]] || venv="$(cd "$venv" && pwd)"

quoted_overrides=""
((${#overrides[@]} == 0)) || quoted_overrides=$(printf ' %q' "${overrides[@]}")
activate=""
[[ -z "$venv" ]] || activate="source $(printf %q "$venv/bin/activate")"
port_expr="${port:-\$((20000 + SLURM_JOB_ID % 20000))}"

sbatch_args=(--job-name="$job_name" --nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus"
             --time="$time_limit" --signal="TERM@$signal_before" --output="$logs/slurm-%j.out")
[[ -z "$partition" ]] || sbatch_args+=(--partition="$partition")
[[ -z "$account" ]] || sbatch_args+=(--account="$account")
((requeue)) && sbatch_args+=(--requeue)

# The batch script; \$ marks what the job expands on the nodes, the rest is fixed now.
script=$(cat <<EOF
#!/usr/bin/env bash
set -euo pipefail
${activate}
export DPT_COORDINATOR="\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1):${port_expr}"
export DPT_NUM_PROCESSES="\$SLURM_NNODES"
echo "dpt-jax job \$SLURM_JOB_ID: \$SLURM_NNODES nodes x ${gpus} GPUs, coordinator \$DPT_COORDINATOR"
# One task per node; DPT_PROCESS_ID is the node's rank. --kill-on-bad-exit stops the peers of a failed node.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c 'DPT_PROCESS_ID=\$SLURM_PROCID exec dpt-jax train \\
    --config $(printf %q "$config") --workdir $(printf %q "$workdir")${quoted_overrides}'
EOF
)

echo "gpu_slurm.sh: $nodes node(s) x $gpus GPU(s), config $config, workdir $workdir, logs $logs/"
echo "gpu_slurm.sh: sbatch ${sbatch_args[*]} <<batch script"
echo "----- batch script -----"
echo "$script"
echo "-------------------------"
((dry_run)) && exit 0

mkdir -p "$logs"
sbatch "${sbatch_args[@]}" <<<"$script"
