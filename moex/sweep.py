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

Variants that continue other variants (reference experiment 4) are named in the config:
  INIT_FROM = {"V": "U"}    V trains from U's final parameters (train.init_from=U's workdir
                            of the same seed); U must come first and be finished
  UPCYCLE = {"V": [flags]}  before training, `python -m moex.upcycle --from=U's workdir
                            --workdir=V's workdir + ".upcycled" --config=FILE:V [flags]`
                            (skipped once that has config.json); V trains from it
  BASELINE = "V"            the variant the seed table's paired differences subtract
                            (default: the first); a tuple: the first of them being run
With INIT_FROM the summary adds eval bits per byte against cumulative training FLOPs
(FIGURE's stem + "_flops.png"): a variant's curve starts at the FLOPs that trained its
source (moex.train.flops model FLOPs, from each workdir's config.json).
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


def _run(cmd: list[str], variant: str, log: str, what: str) -> None:
  logging.info("sweep: %s (log %s)", " ".join(cmd[1:]), log)
  t = time.time()
  with open(log, "a") as f:
    rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
  if rc != 0:
    raise SystemExit(f"moex.sweep: variant {variant!r} failed{what} (exit {rc}); see {log}")
  logging.info("sweep: variant %s%s done in %.0fs", variant, what, time.time() - t)


def run_variant(config: str, variant: str, workdir: str, seed: int | None,
                init_from: str | None = None) -> None:
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  cmd = [sys.executable, "-m", "moex.main", f"--config={config}:{variant}",
         f"--workdir={workdir}"]
  if seed is not None:
    cmd.append(f"--config.seed={seed}")
  if init_from is not None:
    cmd.append(f"--config.train.init_from={init_from}")
  _run(cmd, variant, workdir + ".log", "")


UPCYCLED = ".upcycled"  # ROOT/V.upcycled: moex.upcycle's output, V's train.init_from


def upcycled(directory: str) -> bool:
  """Whether moex.upcycle finished in `directory` (config.json is written last)."""
  return (os.path.exists(os.path.join(directory, "config.json"))
          and os.path.isdir(os.path.join(directory, "params")))


def run_upcycle(config: str, variant: str, source: str, workdir: str, seed: int | None,
                extra: list[str]) -> str:
  """Upcycles `source` into WORKDIR.upcycled (its log is WORKDIR.log); returns that path.

  Not into WORKDIR itself: a params/ there would shadow the run's own checkpoints for a
  later train.init_from or export (init_from reads params/ first)."""
  out = workdir + UPCYCLED
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  cmd = [sys.executable, "-m", "moex.upcycle", f"--from={source}", f"--workdir={out}",
         f"--config={config}:{variant}", *extra]
  if seed is not None:
    cmd.append(f"--config.seed={seed}")
  if not upcycled(out):
    _run(cmd, variant, workdir + ".log", " (upcycle)")
  return out


def start_from(module, variant: str, source: str, workdir: str, seed: int | None) -> str:
  """The train.init_from of a variant with an INIT_FROM source (upcycled first if asked)."""
  before = init_sources(module)[variant]
  if not finished(source, module.get_config(before).train.steps):
    raise SystemExit(f"moex.sweep: variant {variant!r} starts from {before!r}, which has not "
                     f"finished in {source}; run it first")
  upcycle = getattr(module, "UPCYCLE", {})
  if variant not in upcycle:
    return source
  return run_upcycle(_CONFIG.value, variant, source, workdir, seed, list(upcycle[variant]))


def init_sources(module) -> dict[str, str]:
  """The config's INIT_FROM: variant -> the variant whose final parameters it starts from."""
  return dict(getattr(module, "INIT_FROM", {}))


def last_step(workdir: str) -> int:
  """The last evaluated step of a finished run (its parameters start the runs after it)."""
  return max(compare.eval_curve(workdir))


def workdir_of(root: str, variant: str, seed: int | None) -> str:
  """ROOT/V for the config's own seed, ROOT/seedS/V for replicate seed S."""
  return os.path.join(root, variant) if seed is None else os.path.join(root, f"seed{seed}",
                                                                       variant)


def flops_start(module, root: str, variant: str, seed: int | None) -> float:
  """Training FLOPs before the variant's step 0: its INIT_FROM chain's, each source counted
  to its last evaluated step."""
  u = init_sources(module).get(variant)
  if u is None:
    return 0.0
  d = workdir_of(root, u, seed)
  return flops_start(module, root, u, seed) + last_step(d) * compare.flops_per_step(d)


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
  dirs = [workdir_of(root, v, None) for v in variants]
  runs = [(None, v, d) for v, d in zip(variants, dirs)] + [
      (s, v, workdir_of(root, v, s)) for s in replicate_seeds for v in variants]
  sources = init_sources(module)
  for v, u in sources.items():
    if v in variants and u in variants and variants.index(u) > variants.index(v):
      raise app.UsageError(f"{_CONFIG.value}: INIT_FROM[{v!r}] = {u!r} must be a variant "
                           f"listed before {v!r}")
  for i, (seed, v, d) in enumerate(runs):
    name = v if seed is None else f"{v} seed {seed}"
    if finished(d, module.get_config(v).train.steps):
      logging.info("sweep: %s (%d/%d) already finished in %s", name, i + 1, len(runs), d)
      continue
    logging.info("sweep: %s (%d/%d)", name, i + 1, len(runs))
    init = None
    if v in sources:
      init = start_from(module, v, workdir_of(root, sources[v], seed), d, seed)
    run_variant(_CONFIG.value, v, d, seed, init)
  figure = _FIGURE.value or os.path.join(root, "sweep.png")
  md = compare.compare(dirs, variants, figure)
  label = lambda v, seed: f"seed {module.get_config(v).get('seed', 0) if seed is None else seed}"
  by_seed = {v: {} for v in variants}
  for seed, v, d in runs:
    by_seed[v][label(v, seed)] = d
  wanted = getattr(module, "BASELINE", ())
  baseline = next((v for v in ((wanted,) if isinstance(wanted, str) else wanted)
                   if v in by_seed), None)
  if baseline is not None:  # the seed table subtracts its first variant
    by_seed = {baseline: by_seed[baseline], **by_seed}
  if replicate_seeds:
    md += "\n" + compare.compare_seeds(by_seed, figure)
  if any(v in sources for v in variants):
    starts = {v: {label(v, seed): flops_start(module, root, v, seed) for seed, w, _ in runs
                  if w == v} for v in variants}
    md += "\n" + compare.compare_flops({v: by_seed[v] for v in variants}, starts, figure)
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
