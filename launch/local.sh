#!/usr/bin/env bash
# Runs one moex.main command as N processes x M simulated CPU devices on this machine.
#
#   launch/local.sh -n 2 -d 4 -- --config=experiments/tiny.py --workdir=/tmp/moex/mp
#
# Every process gets the same arguments plus the coordinator (localhost:PORT), the process
# count and its id (MOEX_* variables read by moex/parallel/distributed.py). Waits for all;
# if one fails the others are stopped (SIGTERM, SIGKILL 3 s later), the last line names the
# failed process, and the script exits with its status. SIGTERM/SIGINT sent
# to this script are forwarded to every process (a preemption: they agree on a step,
# checkpoint there and exit; re-running the same command resumes).
set -euo pipefail

procs=2
devices=4
port="${MOEX_PORT:-}"
python="${PYTHON:-python}"
logdir=""
usage() { echo "usage: $0 [-n PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] [-l LOGDIR] -- ARGS..." >&2; exit 2; }
while getopts "n:d:p:l:h" opt; do
  case "$opt" in
    n) procs="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) logdir="$OPTARG" ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
[[ $# -gt 0 ]] || usage
if [[ -z "$port" ]]; then
  port=$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi

pids=()
outs=()  # the processes writing each one's output: waited for, so the last line is ours
grace=3  # seconds between SIGTERM and SIGKILL when stopping the others
forward() { echo "local.sh: forwarding $1 to ${#pids[@]} processes" >&2; for p in "${pids[@]}"; do kill -"$1" "$p" 2>/dev/null || true; done; }
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < procs; i++)); do
  if [[ -n "$logdir" ]]; then
    mkdir -p "$logdir"
    exec {out}> >(cat > "$logdir/process_$i.log")
  else
    exec {out}> >(sed "s/^/[p$i] /")
  fi
  outs+=("$!")
  env XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}" \
      JAX_PLATFORMS=cpu \
      MOEX_COORDINATOR_ADDRESS="localhost:${port}" MOEX_NUM_PROCESSES="$procs" \
      MOEX_PROCESS_ID="$i" \
      "$python" -m moex.main "$@" >&"$out" 2>&1 &
  pids+=("$!")
  exec {out}>&-
done

# Stops the processes still running: SIGTERM, then SIGKILL after $grace seconds. With several
# processes JAX's preemption notifier takes SIGTERM, and a survivor waiting for a dead peer
# never acts on it, so SIGTERM alone can leave it hanging until the heartbeat timeout.
stop_others() {
  local p t alive
  for p in "${!running[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for ((t = 0; t < grace * 10; t++)); do
    alive=0
    for p in "${!running[@]}"; do  # an exited but not yet waited-for process is a zombie: done
      if [[ "$(ps -o stat= -p "$p" 2>/dev/null)" =~ ^[^Z] ]]; then alive=1; fi
    done
    (( alive )) || break
    sleep 0.1
  done
  for p in "${!running[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}

status=0
failed=""
declare -A running=()
for ((i = 0; i < procs; i++)); do running[${pids[$i]}]=$i; done
while (( ${#running[@]} > 0 )); do
  done_pid=""
  set +e; wait -n -p done_pid "${!running[@]}" 2>/dev/null; rc=$?; set -e  # no "Killed" notices
  if [[ -z "${done_pid:-}" ]]; then  # a trapped signal, or a process bash already reaped
    for p in "${!running[@]}"; do kill -0 "$p" 2>/dev/null || { done_pid=$p; break; }; done
    [[ -n "$done_pid" ]] || continue
    set +e; wait "$done_pid" 2>/dev/null; rc=$?; set -e
  fi
  i=${running[$done_pid]}
  unset "running[$done_pid]"
  if (( rc != 0 && status == 0 )); then  # the first failure is the one reported
    status=$rc
    failed="local.sh: process $i (pid $done_pid) exited with $rc; stopped the others"
    stop_others 2>/dev/null
  fi
done
wait "${outs[@]}" 2>/dev/null || true
[[ -z "$failed" ]] || echo "$failed" >&2
exit $status
