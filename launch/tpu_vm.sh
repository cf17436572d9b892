#!/usr/bin/env bash
# Train on a Cloud TPU slice with gcloud: one JAX process per TPU VM, all started at once; each
# finds its peers through the TPU metadata server (runtime.distributed=auto). The slice facts
# (VMs, chips, runtime version) come from pretrain/tpu/kinds.py through launch/tpu_args.py, which also
# checks the pretrain command before anything is created.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh COMMAND --name NAME [options] [-- train CONFIG key=value ...]

commands:
  create   create the TPU VM (or queued resource) and wait until it is ready
  run      create it if absent or preempted, ship the code to every worker, install, start
           `python -m pretrain train ...` on all workers at once and wait for them; with
           --retries K it starts again after any exit code but 0 (finished), 2 (bad
           input) and 4 (steps no longer finite): 75 (preempted), 3 (a stuck step), a
           crash, a lost slice; the trainer
           resumes from the latest checkpoint in run.output_dir (every start of one `run`
           passes the same run.launch_id, so checkpoint.overwrite=true never clears a retry's)
  logs     print and follow a worker's training log (--worker N, default 0)
  stop     SIGTERM the trainer on every worker: it saves a checkpoint and exits 75
  delete   delete the TPU VM (or queued resource)

options:
  --name NAME               TPU VM (and queued resource) name; required
  --accelerator-type TYPE   create, run: e.g. v5p-64, v6e-16, v5litepod-256; required
  --zone ZONE, --project P  default: gcloud's configured ones
  --runtime-version V       TPU software version (default: the kind's, from pretrain/tpu/kinds.py)
  --spot | --reserved       spot capacity, or the project's reservation (default: on demand)
  --queued                  go through a queued resource, which waits for capacity; use it
                            for every command on that TPU
  --ref REF                 run: the git commit or branch to ship (default: HEAD)
  --repo URL                run: the git URL workers clone REF from (default: origin's URL)
  --tarball gs://PREFIX     run: ship `git archive REF` through this prefix instead of a clone
  --retries K               run: start again up to K times (default 0)
  --worker N                logs: which worker (default 0)
  --dry-run                 print every gcloud command, run none
  -h, --help                this text

example:
  launch/tpu_vm.sh run --name n --accelerator-type v5p-64 --spot --retries 5 -- \
      train configs/llm/8b.yaml run.output_dir=gs://BUCKET/runs/8b data.source=gs://BUCKET/data
EOF
}

die() { echo "error: $*" >&2; exit 2; }

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
command="" name="" accelerator_type="" runtime_version="" ref=HEAD repo="" tarball="" worker=0
retries=0 spot=0 reserved=0 queued=0 dry_run=0 loc=() pretrain_args=()
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --spot) spot=1 ;;
    --reserved) reserved=1 ;;
    --queued) queued=1 ;;
    --zone | --project) (($# > 1)) || die "$1 needs a value"; loc+=("$1" "$2"); shift ;;
    --name | --accelerator-type | --runtime-version | --ref | --repo | --tarball | --retries | --worker)
      (($# > 1)) || die "$1 needs a value"
      declare "$(tr - _ <<<"${1#--}")=$2"; shift ;; # --accelerator-type X sets accelerator_type=X
    --) shift; pretrain_args=("$@"); break ;;
    -*) die "unknown option $1; see launch/tpu_vm.sh --help" ;;
    *) [[ -z $command ]] || die "one command only, got '$command' and '$1'"; command=$1 ;;
  esac
  shift
done

case $command in
  create | run | logs | stop | delete) ;;
  "") die "no command; use create, run, logs, stop or delete (see --help)" ;;
  *) die "unknown command '$command'; use create, run, logs, stop or delete" ;;
esac
[[ -n $name ]] || die "--name NAME is required: the TPU VM to $command"
[[ $retries =~ ^[0-9]+$ ]] || die "--retries must be a whole number, got '$retries'"
((spot + reserved < 2)) || die "--spot and --reserved exclude each other"
[[ -z $tarball || $tarball == gs://* ]] || die "--tarball must be a gs:// prefix, got '$tarball'"
if [[ $command == create || $command == run ]]; then
  [[ -n $accelerator_type ]] || die "--accelerator-type is required to $command, e.g. v5p-64"
  [[ $command == create || ${#pretrain_args[@]} -gt 0 ]] ||
    die "run needs the pretrain arguments after --, e.g. -- train configs/llm/8b.yaml run.output_dir=gs://BUCKET/run"
  python=${PYTHON:-$root/.venv/bin/python}
  [[ -x $python ]] || python=python3
  # Sets chips, vms, chips_per_vm, topology, runtime_version (the kind's), cloud_type, pretrain_command.
  given_version=$runtime_version
  facts=$("$python" "$root/launch/tpu_args.py" "$accelerator_type" ${pretrain_args[@]+-- "${pretrain_args[@]}"}) ||
    exit $?
  eval "$facts"
  runtime_version=${given_version:-$runtime_version}
fi
((dry_run)) || command -v gcloud >/dev/null || die "gcloud not found; install the Google Cloud CLI (or use --dry-run)"

# Commands are shown on fd 3: stdout for a dry run, stderr otherwise, and never captured by $(...).
if ((dry_run)); then exec 3>&1; else exec 3>&2; fi
quote() { if [[ $1 =~ ^[A-Za-z0-9_./=:@,+%-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi; }
show() { local line="+" arg; for arg in "$@"; do line+=" $(quote "$arg")"; done; echo "$line" >&3; }
gc() { # a gcloud command, with --zone and --project if given
  local cmd=(gcloud "$@" ${loc[@]+"${loc[@]}"})
  show "${cmd[@]}"
  ((dry_run)) || "${cmd[@]}"
}
[[ -z $accelerator_type ]] ||
  echo "$cloud_type: $chips chips in a $topology torus, $vms VMs of $chips_per_vm chips, runtime $runtime_version" >&3

tpu_state() { # READY, PREEMPTED, ... (ACTIVE, SUSPENDED, ... for a queued resource); empty if absent
  if ((queued)); then
    gc compute tpus queued-resources describe "$name" --format='value(state.state)' 2>/dev/null || true
  else
    gc compute tpus tpu-vm describe "$name" --format='value(state)' 2>/dev/null || true
  fi
}

wait_active() { # a queued resource is granted some time after it is created
  local state
  while state=$(tpu_state) && ((!dry_run)) && [[ $state != ACTIVE ]]; do
    case $state in FAILED | SUSPENDED) echo "error: queued resource $name is $state" >&2; exit 1 ;; esac
    echo "queued resource $name is ${state:-not there yet}; waiting" >&2
    sleep 30
  done
}

create() {
  local capacity=()
  ((spot)) && capacity=(--spot)
  ((reserved)) && capacity=(--reserved)
  if ((queued)); then
    gc compute tpus queued-resources create "$name" --node-id "$name" --accelerator-type "$cloud_type" \
      --runtime-version "$runtime_version" ${capacity[@]+"${capacity[@]}"}
    wait_active
  else
    gc compute tpus tpu-vm create "$name" --accelerator-type "$cloud_type" --version "$runtime_version" \
      ${capacity[@]+"${capacity[@]}"}
  fi
}

delete() {
  if ((queued)); then
    gc compute tpus queued-resources delete "$name" --force --quiet
  else
    gc compute tpus tpu-vm delete "$name" --quiet
  fi
}

ensure_tpu() { # one that is there and ready, created again if it was preempted
  local state
  state=$(tpu_state)
  case $state in
    READY | ACTIVE) ;;
    "") create ;;
    PREEMPTED | SUSPENDED | FAILED | TERMINATED) echo "$name is $state: creating it again" >&3; delete; create ;;
    *) ((queued)) || { echo "error: TPU $name is $state; wait, or delete it" >&2; exit 1; }; wait_active ;;
  esac
}

on_workers() { # WORKER COMMAND: run a shell command on one worker, or on all at once
  gc compute tpus tpu-vm ssh "$name" --worker="$1" --command "$2"
}

ship_and_install() { # a fresh copy of the commit in ~/pretrain on every worker, installed into ~/pretrain-venv
  local commit get
  commit=$(git -C "$root" rev-parse --verify --quiet "$ref^{commit}") || die "--ref $ref is not a commit of $root"
  if [[ -n $tarball ]]; then
    local object="${tarball%/}/$name-$commit.tar.gz"
    echo "+ git archive --format=tar.gz $commit | gcloud storage cp - $object" >&3
    ((dry_run)) || git -C "$root" archive --format=tar.gz "$commit" | gcloud storage cp - "$object"
    get="gcloud storage cat $(quote "$object") | tar -xz -C ~/pretrain"
  else
    [[ -n $repo ]] || repo=$(git -C "$root" remote get-url origin 2>/dev/null) ||
      die "this checkout has no remote 'origin'; pass --repo URL, or --tarball gs://PREFIX"
    get="git clone -q $(quote "$repo") ~/pretrain && git -C ~/pretrain checkout -q $commit"
  fi
  # TPU VM images come with Python 3.10; the project needs 3.11+, which uv provides.
  on_workers all "rm -rf ~/pretrain && mkdir -p ~/pretrain && $get && python3 -m pip install -q --user uv &&
{ [ -x ~/pretrain-venv/bin/python ] || ~/.local/bin/uv venv -q --seed --python 3.12 ~/pretrain-venv; } &&
cd ~/pretrain && ~/pretrain-venv/bin/pip install -q -e \".[tpu]\""
}

# As MaxText does before a start: kill whatever still holds the TPU (/dev/accel* up to v4,
# /dev/vfio/* from v5 on), e.g. a trainer whose ssh session was lost, and drop libtpu's lock.
free_tpu='pids=$(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u)
if [ -n "$pids" ]; then
  echo "killing leftover TPU holders: $pids"; sudo kill -9 $pids
  for p in $pids; do tail --pid=$p -f /dev/null; done
fi
sudo rm -f /tmp/libtpu_lockfile'

start_all() { # the trainer on every worker at once; its output lands in the local file $1
  on_workers all "$free_tpu
mkdir -p ~/pretrain-run && cd ~/pretrain &&
{ ~/pretrain-venv/bin/python -m pretrain $pretrain_command > >(tee ~/pretrain-run/train.log) 2>&1 &
  echo \$! > ~/pretrain-run/pid; wait \$!; }
rc=\$?; echo \"pretrain exit code \$rc on \$(hostname)\"; exit \$rc" 2>&1 | tee "$1" || true
}

outcome() { # what one start came to, from the workers' exit codes: finished, failed 2, or why to start again
  local codes
  codes=$(grep -o 'pretrain exit code [0-9]*' "$1" | awk '{print $4}' | sort -un || true)
  # The trainer's exit codes (pretrain/run/runtime.py): 0 finished, 2 bad input and 4 steps that
  # stopped being finite (final: no retry helps), 75 preempted with its checkpoint committed, 3 a
  # stuck step; anything else is a crash (an error, an abort because a peer died) or a lost worker.
  # All but 0, 2 and 4 start again.
  if grep -qx 2 <<<"$codes"; then echo "failed 2"
  elif grep -qx 4 <<<"$codes"; then echo "failed 4"
  elif (($(grep -c 'pretrain exit code' "$1") < vms)); then echo "lost: not every worker reported"
  elif [[ $codes == 0 ]]; then echo finished
  elif grep -qx 75 <<<"$codes"; then echo "preempted: exit code 75"
  elif grep -qx 3 <<<"$codes"; then echo "stuck: exit code 3"
  else echo "exit code $(tail -n 1 <<<"$codes")"
  fi
}

run() {
  local attempt=0 log result
  while :; do
    ensure_tpu
    ship_and_install
    if ((dry_run)); then start_all /dev/null; return 0; fi
    log=$(mktemp "${TMPDIR:-/tmp}/tpu_vm-$name.XXXXXX")
    start_all "$log"
    result=$(outcome "$log")
    echo "$name: $result (output in $log)" >&2
    case $result in
      finished) return 0 ;;
      failed*) return "${result#failed }" ;;
    esac
    ((attempt++ < retries)) || { echo "error: no retries left; run again to resume" >&2; return 3; }
    echo "$name: starting again ($attempt of $retries); the trainer resumes from its latest checkpoint" >&2
  done
}

case $command in
  create) create ;;
  run) run ;;
  logs) on_workers "$worker" 'tail -n 200 -f ~/pretrain-run/train.log' ;;
  stop) on_workers all 'kill -TERM "$(cat ~/pretrain-run/pid)"' ;;
  delete) delete ;;
esac
