"""Several runs side by side: eval curves, routing over time, and one Markdown table (the
library of python -m moex.compare, moex/compare.py, and of moex.sweep's summary).

`compare` reads each workdir as moex.report does (bad lines skipped) and writes OUT (eval bits per
byte against step) and, when any run has MoE statistics, OUT's stem + "_routing.png"
(per run, over train windows: the needed capacity factor and the dropped fraction, mean
over MoE layers, and the dead experts summed over layers). Prints the table of final
numbers (`summarize`) and of eval bits per byte at every eval step.
"""

from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moex import errors, files, report, workdir as workdir_lib

TARGET_DROP = 0.01  # the recommendation column: cf keeping drops under 1% (moex.report)
RECENT = 8  # train windows the final-window columns average over


def eval_curve(workdir: str) -> dict[int, float]:
  """step -> eval bits per byte (the last line wins for a repeated step)."""
  rows = report.read_jsonl(workdir_lib.Workdir(workdir).path / workdir_lib.METRICS)
  return {r["step"]: float(r["bits_per_byte"]) for r in rows
          if r.get("split") == "eval" and r.get("bits_per_byte") is not None}


def _nanmean(values) -> float:
  return report.nan_reduce(np.nanmean, values)


def routing_series(run: report.Run, field: str, reduce=_nanmean) -> tuple[np.ndarray,
                                                                          np.ndarray]:
  """(steps, field reduced over MoE layers) of the train windows."""
  by_step: dict[int, list[float]] = {}
  for r in report.split(run.moe, "train"):
    by_step.setdefault(r["step"], []).append(report.num(r.get(field)))
  steps = np.array(sorted(by_step))
  return steps, np.array([reduce(np.asarray(by_step[s])) for s in steps])


def dead_by_step(run: report.Run) -> dict[int, int]:
  """step -> dead (layer, expert) pairs summed over MoE layers, train windows in step order."""
  dead: dict[int, int] = {}
  for r in report.split(run.moe, "train"):
    dead[r["step"]] = dead.get(r["step"], 0) + report.dead_count(r)
  return dead


def summarize(workdir: str) -> dict:
  """Final numbers of one run (None where the workdir lacks them).

  tokens_per_sec: median over the train log windows (wall clock of this run).
  dropped_fraction: mean over all train windows and MoE layers; the final_* routing
  columns average the last RECENT windows. dead_experts: (layer, expert) pairs with no
  assignment, in the latest window and the most in any window after the first 10%.
  cf_for_1pct: max over layers of moex.report's recommendation for a 1% drop target.
  """
  run = report.load_run(workdir)
  evals = report.split(run.metrics, "eval")
  trains = report.split(run.metrics, "train")
  tps = report.nan_reduce(np.nanmedian, [report.num(r.get("tokens_per_sec"))
                                         for r in trains])
  out = {"workdir": workdir, "steps": evals[-1]["step"] if evals else None,
         "eval_loss": evals[-1].get("loss") if evals else None,
         "eval_bpb": evals[-1].get("bits_per_byte") if evals else None,
         "tokens_per_sec": None if math.isnan(tps) else tps}
  train_moe = report.split(run.moe, "train")
  if not train_moe:
    return out
  steps, drop = routing_series(run, "dropped_fraction")
  _, needed = routing_series(run, "needed_capacity_factor")
  _, churn = routing_series(run, "routing_churn")
  dead = dead_by_step(run)
  late = [n for s, n in dead.items() if s >= 0.1 * steps[-1]]
  rec = [r["recommended_cf"] for r in report.recommend(run, TARGET_DROP, 20)]
  out.update({
      "capacity_factor": report.current_cf(run),
      "dropped_fraction": _nanmean(drop),
      "final_dropped_fraction": _nanmean(drop[-RECENT:]),
      "final_needed_cf": _nanmean(needed[-RECENT:]),
      "cf_for_1pct": None if None in rec or not rec else max(rec),
      "dead_experts": dead[max(dead)],
      "max_dead_experts": max(late) if late else 0,
      "final_routing_churn": (_nanmean(churn[-RECENT:])
                              if np.isfinite(churn).any() else None),
      "final_router_entropy": _nanmean(routing_series(run, "router_entropy")[1][-RECENT:]),
  })
  return out


COLUMNS = (  # (summary key, header, format)
    ("eval_bpb", "final eval bits/byte", ".4f"),
    ("eval_loss", "final eval loss (nats/token)", ".4f"),
    ("tokens_per_sec", "train tok/s (median window)", ",.0f"),
    ("dropped_fraction", "dropped (whole run)", ".2%"),
    ("final_dropped_fraction", "dropped (last windows)", ".2%"),
    ("final_needed_cf", "needed cf (last windows)", ".2f"),
    ("cf_for_1pct", "cf for ≤1% drop", ".2f"),
    ("dead_experts", "dead experts (end)", "d"),
    ("max_dead_experts", "dead experts (max)", "d"),
    ("final_router_entropy", "router entropy (nats)", ".3f"),
    ("final_routing_churn", "routing churn (last windows)", ".2%"),
)


def summary_table(rows: dict[str, dict], columns=COLUMNS) -> str:
  """Markdown: one row per run, the COLUMNS any run has."""
  cols = [c for c in columns if any(r.get(c[0]) is not None for r in rows.values())]
  lines = ["| run | " + " | ".join(h for _, h, _ in cols) + " |",
           "|---|" + "---:|" * len(cols)]
  for label, r in rows.items():
    cells = [format(r[k], f) if r.get(k) is not None else "–" for k, _, f in cols]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def table(curves: dict[str, dict[int, float]]) -> str:
  steps = sorted(set().union(*curves.values()))
  lines = ["| step | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
  for s in steps:
    cells = [f"{c[s]:.4f}" if s in c else "–" for c in curves.values()]
    lines.append(f"| {s} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _figure(ncols: int, width: float):
  fig = Figure(figsize=(width * ncols, 3.6), layout="constrained")
  FigureCanvasAgg(fig)
  return fig, fig.subplots(1, ncols, squeeze=False).ravel()


class CompareError(ValueError, errors.Refusal):
  """A missing workdir, a label count that does not match, a bad --out (one line)."""


def check(dirs: list[str], labels: list[str], out: str) -> None:
  """CompareError, one line naming the flag and value, unless `compare` can run."""
  if not dirs:
    raise CompareError("--workdirs: give at least one workdir")
  for d in dirs:
    if not os.path.isdir(d):
      raise CompareError(f"--workdirs: {d}: "
                         + ("not a directory" if os.path.exists(d) else "no such directory"))
  if len(labels) != len(dirs):
    raise CompareError(f"--labels: {len(labels)} label(s) for {len(dirs)} workdir(s); give "
                       "one per --workdirs entry")
  if os.path.isdir(out):
    raise CompareError(f"--out={out}: is a folder; give the PNG file to write")
  parent = os.path.dirname(os.path.abspath(out))
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise CompareError(f"--out={out}: {parent} is a file, not a folder")


def _save(fig: Figure, out: str) -> None:
  files.save_figure(fig, out)  # renamed into place whole


def plot(curves: dict[str, dict[int, float]], out: str) -> None:
  fig, (ax,) = _figure(1, 6.5)
  for label, c in curves.items():
    steps = np.array(sorted(c))
    ax.plot(steps, [c[s] for s in steps], marker="o", label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("eval bits per byte")
  ax.set_ylim(top=min(max(max(c.values()) for c in curves.values()), 4.0))
  ax.grid(alpha=0.3)
  ax.legend()
  _save(fig, out)


def plot_routing(runs: dict[str, report.Run], out: str) -> bool:
  """Needed capacity factor, dropped fraction and dead experts over steps; False if no run
  has MoE statistics."""
  runs = {k: r for k, r in runs.items() if report.split(r.moe, "train")}
  if not runs:
    return False
  fig, axes = _figure(3, 4.8)
  for i, (label, run) in enumerate(runs.items()):
    color = f"C{i}"
    steps, needed = routing_series(run, "needed_capacity_factor")
    axes[0].plot(steps, needed, color=color, label=label)
    cf = report.current_cf(run)
    if cf:
      axes[0].axhline(cf, color=color, ls=":", lw=1)
    steps, drop = routing_series(run, "dropped_fraction")
    axes[1].plot(steps, drop, color=color, label=label)
    dead = dead_by_step(run)
    axes[2].plot(list(dead), list(dead.values()), color=color, label=label)
  axes[0].set(xlabel="step", ylabel="capacity factor",
              title="Needed capacity factor (mean over layers)")
  axes[1].set(xlabel="step", ylabel="fraction", title="Dropped in training (mean over layers)")
  axes[2].set(xlabel="step", ylabel="(layer, expert) pairs", title="Dead experts (sum over layers)")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend()
  _save(fig, out)
  return True


def seed_table(final: dict[str, dict[str, float | None]]) -> str:
  """Markdown: a final number per variant (rows) and seed (columns), its mean and sample
  standard deviation over seeds, and each variant minus the first variant paired by seed
  (mean ± sd of the differences; a seed missing from either side is left out of the pair).

  `final`: variant -> seed label -> value (None: no value for that seed).
  """
  seeds = list(dict.fromkeys(k for row in final.values() for k in row))
  first, base = next(iter(final.items()))

  def stats(xs):
    xs = [x for x in xs if x is not None]
    mean = f"{np.mean(xs):.4f}" if xs else "–"
    sd = f"{np.std(xs, ddof=1):.4f}" if len(xs) > 1 else "–"
    return mean, sd

  lines = ["| run | " + " | ".join(seeds) + " | mean | sd | " + f"minus {first} (paired) |",
           "|---|" + "---:|" * (len(seeds) + 3)]
  for label, row in final.items():
    cells = [f"{row[s]:.4f}" if row.get(s) is not None else "–" for s in seeds]
    mean, sd = stats([row.get(s) for s in seeds])
    diffs = [row[s] - base[s] for s in seeds
             if row.get(s) is not None and base.get(s) is not None]
    if label == first or not diffs:
      paired = "–"
    else:
      paired = f"{np.mean(diffs):+.4f}" + (f" ± {np.std(diffs, ddof=1):.4f}"
                                           if len(diffs) > 1 else "")
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean} | {sd} | {paired} |")
  return "\n".join(lines)


def _seed_lines(ax, curves: dict[str, list[dict[float, float]]], xmin: float = -np.inf) -> float:
  """Mean over seeds with a min-max band per variant, points at x >= xmin; returns the
  highest value drawn (0 when none)."""
  top = 0.0
  for i, (label, runs) in enumerate(curves.items()):
    xs = sorted(x for x in set.intersection(*(set(c) for c in runs)) if x >= xmin) if runs else []
    if not xs:
      continue
    ys = np.array([[c[x] for x in xs] for c in runs])
    top = max(top, ys.max())
    ax.plot(xs, ys.mean(0), marker="o", color=f"C{i}", label=f"{label} (n={len(runs)})")
    ax.fill_between(xs, ys.min(0), ys.max(0), color=f"C{i}", alpha=0.2)
  return top


def plot_seeds(curves: dict[str, list[dict[float, float]]], out: str) -> None:
  """Eval bits per byte per variant over steps: mean over seeds, min-max band."""
  fig, (ax,) = _figure(1, 6.5)
  top = _seed_lines(ax, curves)
  ax.set(xlabel="step", ylabel="eval bits per byte",
         title="Eval bits per byte: mean over seeds, min-max band")
  ax.set_ylim(top=min(top, 4.0) if top else None)
  ax.grid(alpha=0.3)
  ax.legend()
  _save(fig, out)


def plot_flops(curves: dict[str, list[dict[float, float]]], zoom_from: float, out: str) -> None:
  """plot_seeds against cumulative training FLOPs; a second panel from `zoom_from` (where
  the continued runs start) on."""
  fig, axes = _figure(2, 6.0)
  for ax, xmin in zip(axes, (-np.inf, zoom_from)):
    top = _seed_lines(ax, curves, xmin)
    ax.set(xlabel="cumulative training FLOPs (model FLOPs)", ylabel="eval bits per byte")
    ax.set_ylim(top=min(top, 4.0) if top else None)
    ax.grid(alpha=0.3)
  axes[0].set_title("Eval bits per byte: mean over seeds, min-max band")
  axes[1].set_title("From the first continued run's start")
  axes[0].legend()
  _save(fig, out)


def flops_per_step(workdir: str) -> float:
  """Model FLOPs of one train step of the run in `workdir` (its config; flops.py)."""
  from moex.train import flops  # imports jax: only when needed  pylint: disable=g-import-not-at-top

  cfg = workdir_lib.Workdir(workdir).validated(check_tokenizer=False)
  return flops.train_flops_per_token(cfg) * cfg.data.batch_size * cfg.data.seq_len


def flops_path(out: str) -> str:
  stem, ext = os.path.splitext(out)
  return f"{stem}_flops{ext or '.png'}"


def compare_flops(dirs: dict[str, dict[str, str]], starts: dict[str, dict[str, float]],
                  out: str) -> str:
  """Eval bits per byte against cumulative training FLOPs: a run that starts from another's
  parameters starts at `starts[variant][seed]` (the FLOPs that trained them). Writes
  flops_path(out) (mean over seeds); returns Markdown: FLOPs at each variant's start and end.
  """
  curves, rows = {}, ["| run | training FLOPs before step 0 | training FLOPs at the end |",
                      "|---|---:|---:|"]
  for v, by_seed in dirs.items():
    per_step = {s: flops_per_step(d) for s, d in by_seed.items()
                if workdir_lib.Workdir(d).has_config()}
    runs = {s: eval_curve(d) for s, d in by_seed.items() if s in per_step}
    curves[v] = [{starts[v][s] + step * per_step[s]: y for step, y in c.items()}
                 for s, c in runs.items() if c]
    if curves[v]:
      first = next(s for s, c in runs.items() if c)
      end = starts[v][first] + max(runs[first]) * per_step[first]
      rows.append(f"| {v} | {starts[v][first]:.3e} | {end:.3e} |")
  figure = flops_path(out)
  later = [x for by_seed in starts.values() for x in by_seed.values() if x > 0]
  plot_flops(curves, min(later) if later else 0.0, figure)
  return "Training compute (moex.train.flops):\n\n" + "\n".join(rows) + f"\n\nFigure: {figure}\n"


def seeds_path(out: str) -> str:
  stem, ext = os.path.splitext(out)
  return f"{stem}_seeds{ext or '.png'}"


def compare_seeds(dirs: dict[str, dict[str, str]], out: str) -> str:
  """`dirs`: variant -> seed label -> workdir. Writes seeds_path(out); returns Markdown:
  the final eval bits/byte table over seeds (`seed_table`)."""
  curves = {v: {s: eval_curve(d) for s, d in by_seed.items()} for v, by_seed in dirs.items()}
  figure = seeds_path(out)
  plot_seeds({v: [c for c in by_seed.values() if c] for v, by_seed in curves.items()}, figure)
  final = {v: {s: c[max(c)] if c else None for s, c in by_seed.items()}
           for v, by_seed in curves.items()}
  return ("Final eval bits per byte over seeds:\n\n" + seed_table(final)
          + f"\n\nFigure: {figure}\n")


def routing_path(out: str) -> str:
  stem, ext = os.path.splitext(out)
  return f"{stem}_routing{ext or '.png'}"


def compare(dirs: list[str], labels: list[str], out: str) -> str:
  """Writes the figures; returns the Markdown (summary table, then the eval table).
  CompareError (`check`) before anything is written."""
  check(dirs, labels, out)
  curves = {l: eval_curve(d) for l, d in zip(labels, dirs)}
  plot(curves, out)
  wrote = [out]
  if plot_routing({l: report.load_run(d) for l, d in zip(labels, dirs)}, routing_path(out)):
    wrote.append(routing_path(out))
  md = (summary_table({l: summarize(d) for l, d in zip(labels, dirs)}) + "\n\n"
        + "Eval bits per byte by step:\n\n" + table(curves))
  return md + "\n\nFigures: " + ", ".join(wrote) + "\n"
