#!/usr/bin/env bash
# Rehearse a multi-host run on this machine: N processes of `pretrain ARGS...`, joined by
# jax.distributed through a coordinator on 127.0.0.1, each with its own faked CPU devices.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [--dry-run] N ARGS...

Starts N processes of `pretrain ARGS...` on this machine as one multi-host run: process 0
hosts the jax.distributed coordinator on 127.0.0.1 at a free port, every process gets
runtime.distributed=explicit with its runtime.process_id. Give the devices per process with
runtime.fake_cpu_devices=K (the mesh spans N x K devices). Each output line is prefixed
with [i]. SIGINT/SIGTERM are forwarded to every process. Exits with the first non-zero exit
code of any process (0 if all succeed).

  launch/local.sh 2 smoke llm runtime.fake_cpu_devices=4
  launch/local.sh 2 train configs/llm/smoke.yaml runtime.fake_cpu_devices=4 run.output_dir=runs/two

Environment: PYTHON (default: the repository's .venv/bin/python, else python3).
--dry-run prints the commands and starts nothing.
EOF
}

dry_run=0
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --dry-run) dry_run=1; shift ;;
esac
n="${1:-}"
if ! [[ "$n" =~ ^[1-9][0-9]*$ ]] || [ $# -lt 2 ]; then
  echo "error: launch/local.sh wants a process count N >= 1 and the pretrain arguments, e.g. launch/local.sh 2 smoke llm runtime.fake_cpu_devices=4" >&2
  exit 2
fi
shift

root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

commands=()
for ((i = 0; i < n; i++)); do
  commands+=("$python -m pretrain $* runtime.distributed=explicit runtime.coordinator=127.0.0.1:$port runtime.num_processes=$n runtime.process_id=$i")
done
if [ "$dry_run" = 1 ]; then
  printf '%s\n' "${commands[@]}"
  exit 0
fi

pids=()
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
for ((i = 0; i < n; i++)); do
  # The process itself is the background job (so signals reach it); its output goes through a prefixing filter.
  "$python" -m pretrain "$@" runtime.distributed=explicit "runtime.coordinator=127.0.0.1:$port" \
    "runtime.num_processes=$n" "runtime.process_id=$i" > >(sed -u "s/^/[$i] /") 2> >(sed -u "s/^/[$i] /" >&2) &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  # `wait` returns early when a trapped signal arrives: wait again until the process is gone.
  while true; do
    if wait "$pid"; then code=0; else code=$?; fi
    kill -0 "$pid" 2>/dev/null || break
  done
  if [ "$code" != 0 ] && [ "$status" = 0 ]; then status=$code; fi
done
wait  # the output filters
exit "$status"
