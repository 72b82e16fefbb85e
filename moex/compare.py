"""Several runs side by side: python -m moex.compare.

  python -m moex.compare --workdirs=workdirs/svd_moe,workdirs/svd_dense \\
      --labels=MoE,dense --out=docs/figures/sparse_vs_dense.png

Writes OUT (eval bits per byte against step) and, when any run has MoE statistics, OUT's
stem + "_routing.png"; prints the table of final numbers and of eval bits per byte at every
eval step (moex/report/comparison.py). The workdirs are only read; each PNG is renamed into
place whole. Every refusal (a missing workdir, a label count that does not match, an --out
that is a folder, a bad flag) is one line `moex.compare: ...` on stderr, exit status 2.
"""

from __future__ import annotations

import os

from absl import app, flags

from moex import cli
from moex.report import comparison


def define_flags() -> None:
  flags.DEFINE_list("workdirs", None, "Workdirs to compare.", required=True)
  flags.DEFINE_list("labels", None, "One label per workdir (default: directory names).")
  flags.DEFINE_string("out", "compare.png", "The eval-curve PNG to write.")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  labels = f.labels or [os.path.basename(os.path.normpath(d)) for d in f.workdirs]
  print(comparison.compare(f.workdirs, labels, f.out), flush=True)


if __name__ == "__main__":
  cli.run(main, define_flags, program="moex.compare")
