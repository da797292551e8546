#!/usr/bin/env bash
# Run dpt-jax on a Cloud TPU VM or pod slice: create, install on every worker, train, follow, delete.
#
#   launch/tpu_vm.sh ACTION [options] [CONFIG WORKDIR [--config.key=value ...]]
#   launch/tpu_vm.sh run --project my-proj --zone us-central2-b --accelerator-type v4-32 \
#       --bucket my-bucket configs/probe_sd21.py /gcs/my-bucket/runs/probe_sd21 \
#       --config.pretrained=/gcs/my-bucket/sd21
#
# Every worker runs the same `dpt-jax train` command; dpt_jax/distributed.py finds the other
# workers through the TPU metadata. A slice with several workers needs a WORKDIR they all see
# (orbax writes one checkpoint from all of them): --bucket mounts gs://BUCKET at /gcs/BUCKET on
# every worker with gcsfuse. Training runs under nohup on the workers (an ssh drop does not stop
# it); `logs` follows worker 0, `stop` sends SIGTERM (checkpoint, then exit), and running `start`
# again resumes from the last checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh ACTION [options] [CONFIG WORKDIR [--config.key=value ...]]

actions:
  create    create the TPU VM (or, with --queued, a queued resource and wait until it is active)
  install   copy this source tree to every worker and pip install it with jax[tpu]
  start     start `dpt-jax train CONFIG WORKDIR` on every worker (needs CONFIG WORKDIR)
  logs      follow worker 0's log until training ends; exits with its status
  stop      SIGTERM the training on every worker (it checkpoints and exits)
  delete    delete the TPU VM / queued resource
  run       create, install, start, logs, then delete (unless --keep)

options:
  --project P            GCP project (default: gcloud config get-value project)
  --zone Z               zone, e.g. us-central2-b (default: gcloud config get-value compute/zone)
  --accelerator-type T   e.g. v4-8, v4-32, v5litepod-16 (create / run)
  --version V            TPU software version (default tpu-ubuntu2204-base)
  --name N               TPU name (default dpt-jax-$USER)
  --queued               create through a queued resource (waits for capacity)
  --spot                 spot capacity (preemptible: training checkpoints on SIGTERM)
  --bucket B             mount gs://B at /gcs/B on every worker (gcsfuse) for a shared WORKDIR
  --keep                 run: leave the TPU VM up at the end
  --dry-run              print the gcloud commands, run nothing
  -h, --help             this text
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

(($#)) || { usage >&2; die "no ACTION given"; }
action="$1"; shift
case "$action" in
  create|install|start|logs|stop|delete|run) ;;
  -h|--help) usage; exit 0 ;;
  *) usage >&2; die "unknown ACTION '$action'" ;;
esac

project="" zone="" accelerator="" version="tpu-ubuntu2204-base" name="dpt-jax-${USER:-user}"
queued=0 spot=0 bucket="" keep=0 dry_run=0
positional=()
while (($#)); do
  case "$1" in
    --project) project="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --zone) zone="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --accelerator-type) accelerator="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --version) version="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --name) name="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --bucket) bucket="${2:-}"; shift 2 || die "$1 needs a value" ;;
    --keep) keep=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --config.*) positional+=("$1"); shift ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) positional+=("$1"); shift ;;
  esac
done

# ---- input checks -----------------------------------------------------------------------------
gcloud_config() {  # a gcloud setting, or nothing without gcloud
  if command -v gcloud >/dev/null 2>&1; then gcloud config get-value "$1" 2>/dev/null || true; fi
}
if ((!dry_run)); then
  command -v gcloud >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud CLI (or use --dry-run)"
fi
project="${project:-$(gcloud_config project)}"
zone="${zone:-$(gcloud_config compute/zone)}"
[[ -n "$project" ]] || die "no project: pass --project or run 'gcloud config set project P'"
[[ -n "$zone" ]] || die "no zone: pass --zone (e.g. us-central2-b) or run 'gcloud config set compute/zone Z'"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name '$name': lowercase letters, digits and '-' only"
if [[ "$action" == create || "$action" == run ]]; then
  [[ -n "$accelerator" ]] || die "--accelerator-type is required to create a TPU (e.g. v4-8, v4-32, v5litepod-16)"
  [[ "$accelerator" =~ ^v[0-9]+[a-z]*(pod)?-[0-9]+$ ]] \
    || die "--accelerator-type '$accelerator' does not look like v4-32 / v5litepod-16 / v5p-8"
fi
config="" workdir="" overrides=()
if [[ "$action" == start || "$action" == run ]]; then
  ((${#positional[@]} >= 2)) || die "$action needs CONFIG WORKDIR"
  config="${positional[0]}" workdir="${positional[1]}"
  overrides=("${positional[@]:2}")
  [[ -f "$config" ]] || die "config file not found: $config"
  [[ "$workdir" != gs://* ]] || die "WORKDIR must be a path; mount the bucket with --bucket and use /gcs/BUCKET/..."
  if [[ -n "$bucket" && "$workdir" != /gcs/"$bucket"/* ]]; then
    echo "tpu_vm.sh: warning: WORKDIR $workdir is not under /gcs/$bucket: on several workers it must be shared" >&2
  fi
elif ((${#positional[@]})); then
  die "$action takes no CONFIG / WORKDIR (got: ${positional[*]})"
fi
for o in "${overrides[@]}"; do
  [[ "$o" == --config.* ]] || die "after CONFIG WORKDIR only --config.key=value overrides may follow, got '$o'"
done
# These go into shell commands on the workers: plain characters only (complex values: in the config file).
for word in "$workdir" "$bucket" "${overrides[@]}"; do
  [[ "$word" =~ ^[A-Za-z0-9_./:=,+@%-]*$ ]] || die "'$word' needs quoting: put such values in the config file"
done
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "$config" ]]; then
  # The workers get a copy of this tree: the config must be inside it, named relative to its root.
  config_abs="$(cd "$(dirname "$config")" && pwd)/$(basename "$config")"
  [[ "$config_abs" == "$repo"/* ]] || die "config $config must lie inside $repo (it is copied to the workers)"
  config="${config_abs#"$repo"/}"
fi

# ---- commands -----------------------------------------------------------------------------------
where=(--project="$project" --zone="$zone")
remote_dir="dpt-jax"               # on each worker, under the login user's home
remote_venv="dpt-jax-venv"         # there too: Python >= 3.11, which the pinned JAX stack needs
log_file="dpt-jax-train.log"

run() {  # print a command, then run it unless --dry-run
  echo "+ $*"
  ((dry_run)) || "$@"
}
on_workers() {  # $1: worker (all | 0), $2: shell command run there
  echo "+ gcloud compute tpus tpu-vm ssh $name ${where[*]} --worker=$1 --command=<<'REMOTE'"
  echo "$2"
  echo "REMOTE"
  ((dry_run)) || gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker="$1" --command="$2"
}

do_create() {
  local extra=()
  ((spot)) && extra+=(--spot)
  if ((queued)); then
    run gcloud compute tpus queued-resources create "$name" "${where[@]}" --node-id="$name" \
      --accelerator-type="$accelerator" --runtime-version="$version" "${extra[@]}"
    echo "tpu_vm.sh: waiting for queued resource $name to become ACTIVE"
    ((dry_run)) && return 0
    local state=""
    while [[ "$state" != ACTIVE ]]; do
      state=$(gcloud compute tpus queued-resources describe "$name" "${where[@]}" --format='value(state.state)')
      case "$state" in FAILED|SUSPENDED) die "queued resource $name is $state" ;; esac
      [[ "$state" == ACTIVE ]] || { echo "  state: ${state:-unknown}"; sleep 30; }
    done
  else
    run gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type="$accelerator" \
      --version="$version" "${extra[@]}"
  fi
}

do_install() {
  local archive="${TMPDIR:-/tmp}/dpt-jax-$name.tar.gz"
  # This tree without the local venv, runs and caches.
  run tar -czf "$archive" -C "$repo" --exclude=.git --exclude=.venv --exclude=runs --exclude=launch_logs \
    --exclude="*.egg-info" --exclude=__pycache__ .
  run gcloud compute tpus tpu-vm scp "$archive" "$name":dpt-jax.tar.gz "${where[@]}" --worker=all
  local setup="set -e
rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf dpt-jax.tar.gz -C $remote_dir
python=python3
# The TPU VM images of Ubuntu 22.04 have Python 3.10; their apt has 3.11.
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv
  python=python3.11
fi
\$python -m venv ~/$remote_venv
~/$remote_venv/bin/python -m pip install -q --upgrade pip
~/$remote_venv/bin/python -m pip install -q -e \"${remote_dir}[tpu]\""
  if [[ -n "$bucket" ]]; then
    # gcsfuse from Google's apt repository; --implicit-dirs shows folders made by other workers.
    setup+="
if ! command -v gcsfuse >/dev/null; then
  echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
sudo mkdir -p /gcs/$bucket && sudo chown \$USER /gcs/$bucket
mountpoint -q /gcs/$bucket || gcsfuse --implicit-dirs --rename-dir-limit=100000 $bucket /gcs/$bucket"
  fi
  on_workers all "$setup"
}

do_start() {
  # A wrapper on each worker runs the training under nohup (an ssh drop does not stop it), passes
  # `stop`'s SIGTERM on to it and records its exit status for `logs`.
  local train="dpt-jax train --config $config --workdir $workdir${overrides[*]:+ ${overrides[*]}}"
  on_workers all "cd $remote_dir && rm -f ~/dpt-jax-train.rc && cat > ~/dpt-jax-run.sh <<'EOF'
export PATH=\$HOME/$remote_venv/bin:\$PATH
$train &
child=\$!
trap 'kill -TERM \$child' TERM
while :; do wait \$child; rc=\$?; kill -0 \$child 2>/dev/null || break; done
echo \$rc > ~/dpt-jax-train.rc
EOF
nohup bash ~/dpt-jax-run.sh > ~/$log_file 2>&1 < /dev/null & echo \$! > ~/dpt-jax-train.pid"
}

do_logs() {
  # Follow until the training process ends, then return its exit status.
  on_workers 0 "tail -n +1 -F ~/$log_file --pid=\$(cat ~/dpt-jax-train.pid) 2>/dev/null
rc=\$(cat ~/dpt-jax-train.rc 2>/dev/null || echo 1)
echo \"training exited with status \$rc\"
exit \$rc"
}

do_stop() {
  on_workers all "kill -TERM \$(cat ~/dpt-jax-train.pid) 2>/dev/null || true"
}

do_delete() {
  if ((queued)); then
    run gcloud compute tpus queued-resources delete "$name" "${where[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet
  fi
}

echo "tpu_vm.sh: $action on TPU '$name' (project $project, zone $zone${accelerator:+, $accelerator}${config:+,
  config $config, workdir $workdir})$( ((dry_run)) && echo ' [dry run]')"
case "$action" in
  create) do_create ;;
  install) do_install ;;
  start) do_start ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  run)
    do_create
    # From here on a failure still deletes the VM (unless --keep): an idle TPU costs money.
    if ((!keep)); then trap 'echo "tpu_vm.sh: deleting $name"; do_delete' EXIT; fi
    do_install
    do_start
    do_logs
    ;;
esac
