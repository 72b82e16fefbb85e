"""Routing-health report of a workdir: loss, expert load, drops, capacity, router entropy.

  python -m moex.report --workdir=workdirs/tiny [--out=workdirs/tiny/report] \
      [--target_drop=0.01] [--recent=20]

Reads metrics.jsonl, moe_stats.jsonl and config.json of a finished or still-running run
(bad or torn lines are skipped with a warning) and writes PNG figures and OUT/report.md,
with a capacity factor recommendation per layer (moex/report/capacity.py).
"""

from absl import app

from moex.report import page

if __name__ == "__main__":
  page.define_flags()  # here, not at import, so importing moex.report defines no flags
  app.run(page.main)
