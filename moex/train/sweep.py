"""Runs every variant of an experiment config, then compares them (the library of
python -m moex.sweep, moex/sweep.py; `sweep` is the whole command).

The config file names its variants in a module-level VARIANTS tuple (or pass --variants);
variant V trains with `python -m moex.main --config=FILE:V --workdir=ROOT/V`, one at a time,
its log in ROOT/V.log. A finished variant is skipped and an interrupted one resumes from
its checkpoint, so re-running the command after a crash or preemption loses nothing.
Then the train step of every variant is timed in this one process (moex.bench.train_step,
fresh weights, random tokens: a like-for-like throughput ratio free of other load on the
machine), and ROOT/summary.md gets the moex.compare tables (moex/report/comparison.py), the timing table and figures.

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
source (moex.train.flops model FLOPs, from each workdir's config).

Every refusal and failure (a missing config file, no variants, bad seeds, an INIT_FROM
source listed after its variant or unfinished, a variant whose run fails) is a SweepError,
one line; summary.md and bench.json are renamed into place whole.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from absl import logging

from moex import errors, files, workdir as workdir_lib
from moex.report import comparison


class SweepError(RuntimeError, errors.Refusal):
  """A bad sweep config or flag, or a variant that failed (one line; moex.sweep exits 2)."""


def load_module(path: str):
  if not os.path.isfile(path):
    raise SweepError(f"--config: no such file {path}")
  spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def finished(workdir: str, steps: int) -> bool:
  """Whether metrics.jsonl holds the eval of the last step (moex.workdir decides)."""
  return workdir_lib.Workdir(workdir).finished(steps)


def parse_seeds(given: Sequence[str]) -> list[int]:
  try:
    return [int(s) for s in given]
  except ValueError:
    raise SweepError(f"--seeds: not a list of integers: {','.join(given)}") from None


def _run(cmd: list[str], variant: str, log: str, what: str) -> None:
  logging.info("sweep: %s (log %s)", " ".join(cmd[1:]), log)
  t = time.time()
  caught: list[int] = []

  with open(log, "a") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)

    def forward(signum, frame):  # the run checkpoints and exits; it must not be orphaned
      del frame
      caught.append(signum)
      proc.send_signal(signum)

    before = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      rc = proc.wait()
    finally:
      for s, handler in before.items():
        signal.signal(s, handler)
  if caught:
    raise SweepError(f"stopped by {signal.Signals(caught[0]).name} during variant "
                     f"{variant!r}{what} (its run exited {rc}; see {log}); re-run the same "
                     "command to resume")
  if rc != 0:
    raise SweepError(f"variant {variant!r} failed{what} (exit {rc}); see {log}")
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
  """Whether moex.upcycle finished in `directory` (its config is written last)."""
  wd = workdir_lib.Workdir(directory)
  return wd.has_config() and (wd.path / workdir_lib.PARAMS).is_dir()


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


def start_from(module, config: str, variant: str, source: str, workdir: str,
               seed: int | None) -> str:
  """The train.init_from of a variant with an INIT_FROM source (upcycled first if asked)."""
  before = init_sources(module)[variant]
  if not finished(source, module.get_config(before).train.steps):
    raise SweepError(f"variant {variant!r} starts from {before!r}, which has not finished "
                     f"in {source}; run it first")
  upcycle = getattr(module, "UPCYCLE", {})
  if variant not in upcycle:
    return source
  return run_upcycle(config, variant, source, workdir, seed, list(upcycle[variant]))


def init_sources(module) -> dict[str, str]:
  """The config's INIT_FROM: variant -> the variant whose final parameters it starts from."""
  return dict(getattr(module, "INIT_FROM", {}))


def last_step(workdir: str) -> int:
  """The last evaluated step of a finished run (its parameters start the runs after it)."""
  return max(comparison.eval_curve(workdir))


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
  return flops_start(module, root, u, seed) + last_step(d) * comparison.flops_per_step(d)


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


def sweep(config: str, root: str, variants: Sequence[str] | None = None,
          figure: str | None = None, seeds: Sequence[str] = (), bench_steps: int = 8) -> str:
  """Trains every variant of `config` that has not finished (then the replicate `seeds`),
  writes ROOT/summary.md (and ROOT/bench.json when `bench_steps` > 0); returns the summary.
  """
  module = load_module(config)
  variants = list(variants or getattr(module, "VARIANTS", ()))
  if not variants:
    raise SweepError(f"{config} has no VARIANTS; pass --variants")
  if bench_steps < 0:
    raise SweepError(f"--bench_steps={bench_steps}: must be 0 (no timing) or more")
  replicate_seeds = parse_seeds(seeds)
  if os.path.exists(root) and not os.path.isdir(root):
    raise SweepError(f"--root={root}: is a file, not a folder")
  os.makedirs(root, exist_ok=True)
  dirs = [workdir_of(root, v, None) for v in variants]
  runs = [(None, v, d) for v, d in zip(variants, dirs)] + [
      (s, v, workdir_of(root, v, s)) for s in replicate_seeds for v in variants]
  sources = init_sources(module)
  for v, u in sources.items():
    if v in variants and u in variants and variants.index(u) > variants.index(v):
      raise SweepError(f"{config}: INIT_FROM[{v!r}] = {u!r} must be a variant listed "
                       f"before {v!r}")
  for i, (seed, v, d) in enumerate(runs):
    name = v if seed is None else f"{v} seed {seed}"
    if finished(d, module.get_config(v).train.steps):
      logging.info("sweep: %s (%d/%d) already finished in %s", name, i + 1, len(runs), d)
      continue
    logging.info("sweep: %s (%d/%d)", name, i + 1, len(runs))
    init = None
    if v in sources:
      init = start_from(module, config, v, workdir_of(root, sources[v], seed), d, seed)
    run_variant(config, v, d, seed, init)
  figure = figure or os.path.join(root, "sweep.png")
  md = comparison.compare(dirs, variants, figure)
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
    md += "\n" + comparison.compare_seeds(by_seed, figure)
  if any(v in sources for v in variants):
    starts = {v: {label(v, seed): flops_start(module, root, v, seed) for seed, w, _ in runs
                  if w == v} for v in variants}
    md += "\n" + comparison.compare_flops({v: by_seed[v] for v in variants}, starts, figure)
  if bench_steps > 0:
    timing, results = bench_table(module, variants, bench_steps)
    md += "\n" + timing + "\n"
    files.write_text(os.path.join(root, "bench.json"), json.dumps(results, indent=2))
  files.write_text(os.path.join(root, "summary.md"),
         f"# {os.path.basename(config)}: {', '.join(variants)}\n\n{md}")
  logging.info("sweep: wrote %s", os.path.join(root, "summary.md"))
  return md
