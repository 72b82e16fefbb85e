"""Eval curves of several runs side by side: one PNG and a Markdown table.

  python -m moex.compare --workdirs=workdirs/svd_moe,workdirs/svd_dense \
      --labels=MoE,dense --out=docs/figures/sparse_vs_dense.png

Reads each workdir's metrics.jsonl (bad lines skipped, as moex.report does) and plots eval
bits per byte against step; prints the table of eval bits per byte at every eval step.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moex import report


def eval_curve(workdir: str) -> dict[int, float]:
  """step -> eval bits per byte (the last line wins for a repeated step)."""
  rows = report.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: float(r["bits_per_byte"]) for r in rows
          if r.get("split") == "eval" and r.get("bits_per_byte") is not None}


def table(curves: dict[str, dict[int, float]]) -> str:
  steps = sorted(set().union(*curves.values()))
  lines = ["| step | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
  for s in steps:
    cells = [f"{c[s]:.4f}" if s in c else "–" for c in curves.values()]
    lines.append(f"| {s} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot(curves: dict[str, dict[int, float]], out: str) -> None:
  fig = Figure(figsize=(6.5, 3.6))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for label, c in curves.items():
    steps = np.array(sorted(c))
    ax.plot(steps, [c[s] for s in steps], marker="o", label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("eval bits per byte")
  ax.set_ylim(top=min(max(max(c.values()) for c in curves.values()), 4.0))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=120)


def main(argv):
  del argv
  dirs = flags.FLAGS.workdirs
  labels = flags.FLAGS.labels or [os.path.basename(os.path.normpath(d)) for d in dirs]
  if len(labels) != len(dirs):
    raise app.UsageError("--labels needs one label per --workdirs entry")
  curves = {l: eval_curve(d) for l, d in zip(labels, dirs)}
  plot(curves, flags.FLAGS.out)
  print(table(curves))
  print(f"moex.compare: {flags.FLAGS.out}")


if __name__ == "__main__":
  flags.DEFINE_list("workdirs", None, "Workdirs to compare.", required=True)
  flags.DEFINE_list("labels", None, "One label per workdir (default: directory names).")
  flags.DEFINE_string("out", "compare.png", "The PNG to write.")
  app.run(main)
