"""Routing-health report of a workdir: loss, expert load, drops, capacity, router entropy.

  python -m moex.report --workdir=workdirs/tiny [--out=workdirs/tiny/report] \\
      [--target_drop=0.01] [--recent=20]

Reads metrics.jsonl, moe_stats.jsonl and config.json of a finished or still-running run
(bad or torn lines are skipped with a warning; the workdir is only read) and writes PNG
figures and OUT/report.md (renamed into place whole), with a capacity factor recommendation
per layer (moex/report/capacity.py). Every refusal (a missing workdir, an --out that is a
file, a --target_drop outside [0, 1), a bad flag) is one line `moex.report: ...` on stderr,
exit status 2.
"""

from __future__ import annotations

from absl import app, flags

from moex import cli
from moex.report import page


def define_flags() -> None:
  """The command's flags (defined by cli.run: importing moex.report defines none)."""
  flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
  flags.DEFINE_string("out", None, "Output folder (default WORKDIR/report).")
  flags.DEFINE_float("target_drop", 0.01, "Drop fraction the recommendation allows.")
  flags.DEFINE_integer("recent", 20, "Train windows the recommendation looks at.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  print(f"moex.report: {page.write_report(f.workdir, f.out, f.target_drop, f.recent)}",
        flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.report")
