#!/usr/bin/env bash
# Start N processes of one multi-process JAX job on this machine, each with its own log.
#
#   launch/local.sh [options] -- COMMAND [ARGS...]
#   launch/local.sh -n 2 -d 2 -- dpt-jax train --config configs/probe_tiny.py --workdir runs/mh
#
# Each process gets DPT_COORDINATOR=127.0.0.1:PORT, DPT_NUM_PROCESSES=N and DPT_PROCESS_ID=i
# (read by dpt_jax/distributed.py). SIGTERM / Ctrl-C is passed on to every process (a training
# run saves a checkpoint and stops); if one process fails the others are stopped too.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local.sh [options] -- COMMAND [ARGS...]

  -n, --processes N            processes to start (default 2)
  -d, --devices-per-process D  CPU: each process gets D host devices (sets XLA_FLAGS, JAX_PLATFORMS=cpu)
  -g, --gpus-per-process G     GPU: process i uses GPUs i*G .. i*G+G-1 (DPT_LOCAL_DEVICE_IDS)
  -p, --port P                 coordinator port on 127.0.0.1 (default: a free port)
  -l, --logs DIR               logs DIR/process_<i>.log (default: launch_logs/<date-time>)
  -q, --quiet                  do not stream process 0's log to the terminal
      --grace S                seconds between SIGTERM and SIGKILL when a peer failed (default 60)
      --dry-run                print what would run, start nothing
  -h, --help                   this text
EOF
}

die() { echo "local.sh: $*" >&2; exit 2; }
is_count() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }

processes=2 devices="" gpus="" port="" logs="" quiet=0 grace=60 dry_run=0
while (($#)); do
  case "$1" in
    -n|--processes) processes="${2:-}"; shift 2 || die "$1 needs a value" ;;
    -d|--devices-per-process) devices="${2:-}"; shift 2 || die "$1 needs a value" ;;
    -g|--gpus-per-process) gpus="${2:-}"; shift 2 || die "$1 needs a value" ;;
    -p|--port) port="${2:-}"; shift 2 || die "$1 needs a value" ;;
    -l|--logs) logs="${2:-}"; shift 2 || die "$1 needs a value" ;;
    -q|--quiet) quiet=1; shift ;;
    --grace) grace="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) usage >&2; die "unknown option $1 (the command goes after --)" ;;
  esac
done

(($#)) || { usage >&2; die "no command given: put it after --"; }
is_count "$processes" || die "--processes must be a positive integer, got '$processes'"
[[ -z "$devices" ]] || is_count "$devices" || die "--devices-per-process must be a positive integer, got '$devices'"
[[ -z "$gpus" ]] || is_count "$gpus" || die "--gpus-per-process must be a positive integer, got '$gpus'"
[[ -z "$devices" || -z "$gpus" ]] || die "give --devices-per-process (CPU) or --gpus-per-process (GPU), not both"
is_count "$grace" || die "--grace must be a positive integer, got '$grace'"
command -v "$1" >/dev/null 2>&1 || die "command not found: $1 (activate the environment that has dpt-jax?)"

# A config file named in the command must exist (also --config=FILE; ml_collections' FILE:ARG form).
prev=""
for arg in "$@"; do
  config=""
  if [[ "$prev" == "--config" ]]; then config="$arg"; fi
  if [[ "$arg" == --config=* ]]; then config="${arg#--config=}"; fi
  if [[ -n "$config" && ! -f "$config" && ! -f "${config%:*}" ]]; then
    die "config file not found: $config"
  fi
  prev="$arg"
done

if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
    || die "could not find a free port: give --port"
fi
is_count "$port" || die "--port must be a port number, got '$port'"
logs="${logs:-launch_logs/$(date +%Y%m%d-%H%M%S)}"

env_of() {  # the environment of process $1, as NAME=VALUE words
  local i="$1"
  local -a e=("DPT_COORDINATOR=127.0.0.1:$port" "DPT_NUM_PROCESSES=$processes" "DPT_PROCESS_ID=$i")
  if [[ -n "$devices" ]]; then
    e+=("JAX_PLATFORMS=cpu" "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices")
  fi
  if [[ -n "$gpus" ]]; then
    e+=("DPT_LOCAL_DEVICE_IDS=$(seq -s, $((i * gpus)) $((i * gpus + gpus - 1)))")
  fi
  printf '%s\n' "${e[@]}"
}

echo "local.sh: $processes processes, coordinator 127.0.0.1:$port, logs in $logs/"
for ((i = 0; i < processes; i++)); do
  mapfile -t penv < <(env_of "$i")
  printf 'local.sh: process %d: %s %s > %s/process_%d.log\n' "$i" "${penv[*]}" "$*" "$logs" "$i"
done
((dry_run)) && exit 0

mkdir -p "$logs"
pids=()
for ((i = 0; i < processes; i++)); do
  mapfile -t penv < <(env_of "$i")
  env "${penv[@]}" "$@" >"$logs/process_$i.log" 2>&1 &
  pids+=("$!")
done
if ((!quiet)); then
  tail -n +1 -f --pid="${pids[0]}" "$logs/process_0.log" &
fi

stop_all() {  # $1: signal for every process still running
  local pid
  for pid in "${pids[@]}"; do kill -s "$1" "$pid" 2>/dev/null || true; done
}
trap 'echo "local.sh: passing SIGTERM on to all processes" >&2; stop_all TERM' TERM INT

declare -A status=()
failed_at=""
while ((${#status[@]} < processes)); do
  for ((i = 0; i < processes; i++)); do
    [[ -n "${status[$i]:-}" ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0; wait "${pids[$i]}" || rc=$?
    status[$i]=$rc
    echo "local.sh: process $i exited with status $rc"
    if ((rc != 0)) && [[ -z "$failed_at" ]]; then
      echo "local.sh: process $i failed (log: $logs/process_$i.log); stopping the others" >&2
      stop_all TERM
      failed_at=$SECONDS
    fi
  done
  # Peers of a dead process can block in a collective: SIGKILL them after the grace period.
  if [[ -n "$failed_at" ]] && ((SECONDS - failed_at > grace)); then stop_all KILL; fi
  ((${#status[@]} < processes)) && sleep 0.2
done
wait 2>/dev/null || true  # the log follower

worst=0
for ((i = 0; i < processes; i++)); do ((status[$i] == 0)) || worst=${status[$i]}; done
exit "$worst"
