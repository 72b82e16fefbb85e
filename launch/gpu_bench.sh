#!/usr/bin/env bash
# The GPU benchmark: Mixtral-shaped layers on one GPU, capacity vs dropless, and
# jax.lax.ragged_dot vs the chunked grouped matmul; under 5 minutes on one H100.
#
#   launch/gpu_bench.sh [OUTDIR]
#
# Prints one line per variant and a table last; JSON copies go to OUTDIR (default
# ./gpu_bench). Record the card's name and the numbers in WORKSPACE.md.
set -euo pipefail
out="${1:-gpu_bench}"
python="${PYTHON:-python}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
for variant in capacity dropless dropless_chunked; do
  arg=""
  [[ "$variant" != capacity ]] && arg=":$variant"
  timeout 90 "$python" -m moex.bench.train_step --config="experiments/mixtral_gpu.py$arg" \
    --steps=5 --warmup=2 --json="$out/$variant.json" || echo "$variant: failed or timed out"
done
"$python" - "$out" <<'PY'
import json, pathlib, sys
print(f"{'variant':18s} {'step ms':>9s} {'tok/s':>9s} {'TFLOP/s/dev':>12s} {'MFU':>7s}")
for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
  r = json.loads(p.read_text())
  mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
  print(f"{p.stem:18s} {r['step_ms']:9.1f} {r['tokens_per_sec']:9.0f} "
        f"{r['model_tflops_per_sec_per_device']:12.1f} {mfu:>7s}")
PY
