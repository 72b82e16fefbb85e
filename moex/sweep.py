"""Runs every variant of an experiment config, then compares them: one command per study.

  python -m moex.sweep --config=experiments/capacity_sweep.py --root=workdirs/cf_sweep \
      [--variants=1.0,2.0] [--figure=docs/figures/capacity_sweep.png] [--bench_steps=8] \
      [--seeds=1,2]

The config file names its variants in a module-level VARIANTS tuple (or pass --variants);
variant V trains with `python -m moex.main --config=FILE:V --workdir=ROOT/V`, one at a time,
its log in ROOT/V.log. A finished variant is skipped and an interrupted one resumes from
its checkpoint, so re-running the command after a crash or preemption loses nothing.
Then the train step of every variant is timed in this one process (moex.bench.train_step,
fresh weights, random tokens: a like-for-like throughput ratio free of other load on the
machine), and ROOT/summary.md gets the moex.compare tables, the timing table and figures.

--seeds=1,2 adds replicates: every variant trains again with config.seed=S in ROOT/seedS/V
(after all of ROOT/V), and the summary adds each variant's final eval bits per byte per
seed, mean, standard deviation and difference from the first variant paired by seed, with a
mean-over-seeds figure (FIGURE's stem + "_seeds.png"). Differences between variants smaller
than the spread between seeds are not results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

from absl import app, flags, logging

from moex import compare, report

_CONFIG = flags.DEFINE_string("config", None, "Experiment config file with VARIANTS.",
                              required=True)
_ROOT = flags.DEFINE_string("root", None, "One workdir per variant goes under here.",
                            required=True)
_VARIANTS = flags.DEFINE_list("variants", None, "Variants to run (default: VARIANTS).")
_FIGURE = flags.DEFINE_string("figure", None, "Eval-curve PNG (default ROOT/sweep.png); "
                              "the routing figure goes next to it as *_routing.png.")
_SEEDS = flags.DEFINE_list("seeds", [], "Replicate seeds: each variant also trains with "
                           "config.seed=S in ROOT/seedS/V.")
_BENCH_STEPS = flags.DEFINE_integer("bench_steps", 8, "Timed train steps per variant in the "
                                    "throughput comparison; 0 skips it.")


def load_module(path: str):
  if not os.path.isfile(path):
    raise app.UsageError(f"--config: no such file {path}")
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def finished(workdir: str, steps: int) -> bool:
  """Whether metrics.jsonl holds the eval of the last step."""
  rows = report.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if os.path.exists(
      os.path.join(workdir, "metrics.jsonl")) else []
  return any(r.get("split") == "eval" and r["step"] >= steps for r in rows)


def seeds() -> list[int]:
  try:
    return [int(s) for s in _SEEDS.value]
  except ValueError:
    raise app.UsageError(f"--seeds: not a list of integers: {','.join(_SEEDS.value)}")


def run_variant(config: str, variant: str, workdir: str, seed: int | None) -> None:
  log = workdir + ".log"
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  cmd = [sys.executable, "-m", "moex.main", f"--config={config}:{variant}",
         f"--workdir={workdir}"]
  if seed is not None:
    cmd.append(f"--config.seed={seed}")
  logging.info("sweep: %s (log %s)", " ".join(cmd[1:]), log)
  t = time.time()
  with open(log, "a") as f:
    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
  if rc != 0:
    raise SystemExit(f"moex.sweep: variant {variant!r} failed (exit {rc}); see {log}")
  logging.info("sweep: variant %s done in %.0fs", variant, time.time() - t)


def bench_table(module, variants: list[str], steps: int) -> tuple[str, dict]:
  """Train-step throughput of every variant, timed back to back in this process."""
  from moex.bench import train_step  # imports jax: only when timing

  results = {}
  for v in variants:
    logging.info("sweep: timing variant %s", v)
    results[v] = train_step.bench(module.get_config(v), steps, warmup=2)
  base = results[variants[0]]["tokens_per_sec"]
  device = results[variants[0]]["device"]
  lines = [f"Train step timed back to back ({steps} steps each, {device}):", "",
           "| run | step ms | tok/s | relative to " + variants[0] + " | MFU |",
           "|---|---:|---:|---:|---:|"]
  for v, r in results.items():
    mfu = "–" if r["mfu"] is None else f"{r['mfu']:.1%}"
    lines.append(f"| {v} | {r['step_ms']:.1f} | {r['tokens_per_sec']:,.0f} | "
                 f"{r['tokens_per_sec'] / base:.2f} | {mfu} |")
  return "\n".join(lines), results


def main(argv):
  del argv
  module = load_module(_CONFIG.value)
  variants = _VARIANTS.value or list(getattr(module, "VARIANTS", ()))
  if not variants:
    raise app.UsageError(f"{_CONFIG.value} has no VARIANTS; pass --variants")
  root = _ROOT.value
  replicate_seeds = seeds()
  os.makedirs(root, exist_ok=True)
  dirs = [os.path.join(root, v) for v in variants]
  runs = [(None, v, d) for v, d in zip(variants, dirs)] + [
      (s, v, os.path.join(root, f"seed{s}", v)) for s in replicate_seeds for v in variants]
  for i, (seed, v, d) in enumerate(runs):
    name = v if seed is None else f"{v} seed {seed}"
    if finished(d, module.get_config(v).train.steps):
      logging.info("sweep: %s (%d/%d) already finished in %s", name, i + 1, len(runs), d)
      continue
    logging.info("sweep: %s (%d/%d)", name, i + 1, len(runs))
    run_variant(_CONFIG.value, v, d, seed)
  figure = _FIGURE.value or os.path.join(root, "sweep.png")
  md = compare.compare(dirs, variants, figure)
  if replicate_seeds:
    by_seed = {v: {f"seed {module.get_config(v).get('seed', 0)}": d}
               for v, d in zip(variants, dirs)}
    for seed, v, d in runs[len(variants):]:
      by_seed[v][f"seed {seed}"] = d
    md += "\n" + compare.compare_seeds(by_seed, figure)
  if _BENCH_STEPS.value > 0:
    timing, results = bench_table(module, variants, _BENCH_STEPS.value)
    md += "\n" + timing + "\n"
    with open(os.path.join(root, "bench.json"), "w") as f:
      json.dump(results, f, indent=2)
  with open(os.path.join(root, "summary.md"), "w") as f:
    f.write(f"# {os.path.basename(_CONFIG.value)}: {', '.join(variants)}\n\n{md}")
  print(md)
  logging.info("sweep: wrote %s", os.path.join(root, "summary.md"))


if __name__ == "__main__":
  app.run(main)
