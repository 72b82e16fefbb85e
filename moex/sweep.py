"""Runs every variant of an experiment config, then compares them: python -m moex.sweep.

  python -m moex.sweep --config=experiments/capacity_sweep.py --root=workdirs/cf_sweep \\
      [--variants=1.0,2.0] [--figure=docs/figures/capacity_sweep.png] [--bench_steps=8] \\
      [--seeds=1,2]

Variant V of the config's VARIANTS trains in ROOT/V (log ROOT/V.log), one at a time; a
finished variant is skipped and an interrupted one resumes from its checkpoint, so re-running
the command after a crash or preemption loses nothing. Then ROOT/summary.md gets the
comparison tables, a back-to-back timing table and the figures. INIT_FROM, UPCYCLE,
BASELINE and replicate seeds: moex/train/sweep.py. Every refusal (a bad flag, config file or
INIT_FROM order) and a failed variant (naming its log) is one line `moex.sweep: ...` on
stderr, exit status 2.
"""

from __future__ import annotations

from absl import app, flags

from moex import cli
from moex.train import sweep


def define_flags() -> None:
  flags.DEFINE_string("config", None, "Experiment config file with VARIANTS.", required=True)
  flags.DEFINE_string("root", None, "One workdir per variant goes under here.", required=True)
  flags.DEFINE_list("variants", None, "Variants to run (default: VARIANTS).")
  flags.DEFINE_string("figure", None, "Eval-curve PNG (default ROOT/sweep.png); the routing "
                      "figure goes next to it as *_routing.png.")
  flags.DEFINE_list("seeds", [], "Replicate seeds: each variant also trains with "
                    "config.seed=S in ROOT/seedS/V.")
  flags.DEFINE_integer("bench_steps", 8, "Timed train steps per variant in the throughput "
                       "comparison; 0 skips it.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  print(sweep.sweep(f.config, f.root, f.variants, f.figure, f.seeds, f.bench_steps),
        flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.sweep")
