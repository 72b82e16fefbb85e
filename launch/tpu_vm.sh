#!/usr/bin/env bash
# Runs one moex.main command on every worker of a TPU VM pod slice.
#
#   launch/tpu_vm.sh --name moex-v5p --zone us-east5-a --type v5p-32 \
#       [--version tpu-ubuntu2204-base] [--spot] [--delete] [--dry-run] \
#       -- --config=experiments/tiny.py --workdir=gs://BUCKET/moex/tiny
#
# Creates the slice if it does not exist (reuses it otherwise), copies this checkout to
# every worker and installs it, runs the same command on all workers (--worker=all; JAX
# finds its peers on a TPU VM by itself), and deletes the slice afterwards with --delete.
# --dry-run prints every gcloud command instead of running it.
# On a spot slice, preemption sends SIGTERM: the workers agree on a step, checkpoint and
# exit; re-running this script with the same --workdir resumes.
set -euo pipefail

name="" zone="" type="" version="tpu-ubuntu2204-base" spot="" delete="" dry=""
project_flag=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --project) project_flag=(--project "$2"); shift 2 ;;
    --spot) spot="--spot"; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    *) echo "tpu_vm.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ -n "$name" && -n "$zone" && -n "$type" && $# -gt 0 ]] || {
  echo "usage: $0 --name NAME --zone ZONE --type TYPE [--spot] [--delete] [--dry-run] -- MAIN_ARGS..." >&2
  exit 2
}

run() {
  if [[ -n "$dry" ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

repo="$(cd "$(dirname "$0")/.." && pwd)"
tpu=(gcloud compute tpus tpu-vm "${project_flag[@]}")
if [[ -z "$dry" ]] && "${tpu[@]}" describe "$name" --zone "$zone" >/dev/null 2>&1; then
  echo "tpu_vm.sh: reusing $name" >&2
else
  run "${tpu[@]}" create "$name" --zone "$zone" --accelerator-type "$type" \
      --version "$version" $spot
fi
archive="/tmp/moex-$$.tar.gz"
run tar -czf "$archive" -C "$repo" --exclude=.git --exclude=.venv --exclude=workdirs .
run "${tpu[@]}" scp "$archive" "$name:/tmp/moex.tar.gz" --zone "$zone" --worker=all
setup='rm -rf ~/moex && mkdir -p ~/moex && tar -xzf /tmp/moex.tar.gz -C ~/moex && cd ~/moex && python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . "jax[tpu]"'
run "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all --command "$setup"
main="cd ~/moex && .venv/bin/python -m moex.main $(printf '%q ' "$@")"
status=0
run "${tpu[@]}" ssh "$name" --zone "$zone" --worker=all --command "$main" || status=$?
if [[ -n "$delete" ]]; then
  run "${tpu[@]}" delete "$name" --zone "$zone" --quiet
fi
exit $status
