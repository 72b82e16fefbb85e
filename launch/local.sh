#!/usr/bin/env bash
# Runs one moex.main command as N processes x M simulated CPU devices on this machine.
#
#   launch/local.sh -n 2 -d 4 -- --config=experiments/tiny.py --workdir=/tmp/moex/mp
#
# Every process gets the same arguments plus the coordinator (localhost:PORT), the process
# count and its id (MOEX_* variables read by moex/parallel/distributed.py). Waits for all;
# if one fails the others are stopped, and the script exits non-zero. SIGTERM/SIGINT sent
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
stop_all() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; }
forward() { echo "local.sh: forwarding $1 to ${#pids[@]} processes" >&2; for p in "${pids[@]}"; do kill -"$1" "$p" 2>/dev/null || true; done; }
trap 'forward TERM' TERM
trap 'forward INT' INT

for ((i = 0; i < procs; i++)); do
  env XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}" \
      JAX_PLATFORMS=cpu \
      MOEX_COORDINATOR_ADDRESS="localhost:${port}" MOEX_NUM_PROCESSES="$procs" \
      MOEX_PROCESS_ID="$i" \
      "$python" -m moex.main "$@" \
      > >(if [[ -n "$logdir" ]]; then mkdir -p "$logdir"; cat > "$logdir/process_$i.log"; else sed "s/^/[p$i] /"; fi) 2>&1 &
  pids+=("$!")
done

status=0
remaining=${#pids[@]}
declare -A done_pids=()
while (( remaining > 0 )); do
  for p in "${pids[@]}"; do
    [[ -n "${done_pids[$p]:-}" ]] && continue
    if ! kill -0 "$p" 2>/dev/null; then
      set +e; wait "$p"; rc=$?; set -e
      done_pids[$p]=1
      remaining=$((remaining - 1))
      if (( rc != 0 && status == 0 )); then  # the first failure is the one reported
        echo "local.sh: process pid $p exited with $rc; stopping the others" >&2
        status=$rc
        stop_all
      fi
    fi
  done
  sleep 0.5
done
exit $status
