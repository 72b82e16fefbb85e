"""The report page: summary, capacity recommendation and figures in OUT/report.md."""

from __future__ import annotations

import math
import os

import numpy as np
from absl import logging

from moex import errors, files, workdir as workdir_lib
from moex.report import capacity, figures, read
from moex.report.read import Run


def summary(run: Run, recent: int) -> dict:
  """The numbers at the top of the page (None where the workdir lacks them)."""
  steps = [r["step"] for r in run.metrics + run.moe]
  moe_cfg = run.config.get("moe", {})
  latest = read.latest_train(run)
  any_rec = next(iter(latest.values()), run.moe[-1] if run.moe else {})
  recent_drop = [read.num(r.get("dropped_fraction"))
                 for rs in read.by_layer(read.split(run.moe, "train")).values()
                 for r in rs[-recent:]]
  overload = [read.num(r["overload_factor"]) for r in latest.values() if "overload_factor" in r]
  dispatch = {r["split"]: r.get("dispatch") for r in run.moe}
  return {
      "steps": max(steps) if steps else None,
      "final_train_loss": read.last(run.metrics, "train", "loss"),
      "final_eval_bpb": read.last(run.metrics, "eval", "bits_per_byte"),
      "moe_layers": sorted({r["layer"] for r in run.moe}),
      "num_experts": any_rec.get("num_experts", moe_cfg.get("num_experts")),
      "top_k": any_rec.get("top_k", moe_cfg.get("top_k")),
      "dispatch": dispatch or {"train": moe_cfg.get("dispatch")},
      "current_cf": capacity.current_cf(run),
      "recent_dropped": read.nan_reduce(np.nanmean, recent_drop),
      "dead_experts": read.dead_experts(run),
      "max_overload_factor": max(overload) if overload else None,
  }


def _fmt(v, spec: str = ".4f") -> str:
  if v is None:
    return "–"
  return format(v, spec) if math.isfinite(v) else str(v)


def _dead_md(dead: dict[int, list[int] | int], num_experts: int | None) -> str:
  """'layer 1: [3]' for listed experts, 'layer 0: 102 of 256' where only the count is known."""
  parts = [f"layer {layer}: {d}" if isinstance(d, list) else f"layer {layer}: {d} of "
           f"{_fmt(num_experts, 'd')}" for layer, d in dead.items()]
  return "; ".join(parts) or "none"


def summary_md(s: dict) -> list[str]:
  dispatch = ", ".join(f"{k}: {v}" for k, v in s["dispatch"].items())
  cf = "dropless" if s["current_cf"] is None else f"{s['current_cf']:g}"
  lines = [
      "## Summary", "",
      f"- steps: {_fmt(s['steps'], 'd')}; final train loss {_fmt(s['final_train_loss'])}; "
      f"final eval {_fmt(s['final_eval_bpb'])} bits/byte",
      f"- MoE layers {s['moe_layers'] or '–'}; {_fmt(s['num_experts'], 'd')} experts, "
      f"top_k {_fmt(s['top_k'], 'd')}; dispatch {dispatch}; training capacity factor {cf}",
      f"- mean dropped fraction over recent train windows: {_fmt(s['recent_dropped'])}",
      f"- dead experts (zero load in the latest train window): "
      f"{_dead_md(s['dead_experts'], s['num_experts'])}",
  ]
  if s["max_overload_factor"] is not None:
    lines.append(f"- overload factor (max over layers, latest window; 1.0 = even ranks): "
                 f"{s['max_overload_factor']:.3f}")
  return lines + [""]


def recommendation_md(rows: list[dict], target: float, recent: int) -> list[str]:
  lines = ["## Capacity factor recommendation", ""]
  if not rows:
    return lines + [f"No train windows in {workdir_lib.MOE_STATS}: nothing to recommend.", ""]
  cf_now = rows[0]["current_cf"]
  lines += [
      f"Smallest factor keeping drops ≤ {target:.2%} in ≥ {capacity.WINDOW_QUANTILE:.0%} of "
      f"the last {recent} train windows, estimated from each window's per-sequence load "
      "histogram (compare the actual and estimated drops at the current factor); records "
      "without one get no estimate (`estimate` says why). `max needed` is the exact "
      "per-sequence dropless bound over the same windows. Cost = expert buffer rows and "
      "expert FLOPs relative to the current factor.",
      "",
  ]
  if cf_now is None:
    lines += ["**Dropless run**: nothing is dropped; the table says what a capacity run "
              "would need.", ""]
  lines += ["| layer | windows | dropped (actual) | dropped (estimated) | estimate | "
            "recommended cf | max needed cf | current cf | cost |",
            "|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
  for r in rows:
    if r["estimate"] != capacity.ESTIMATE:
      rec = "–"
    else:
      rec = "> 8.0" if r["recommended_cf"] is None else f"{r['recommended_cf']:.2f}"
    cur = "dropless" if r["current_cf"] is None else f"{r['current_cf']:g}"
    cost = "–" if r["cost"] is None else f"{r['cost']:.2f}×"
    lines.append(f"| {r['layer']} | {r['windows']} | {_fmt(r['recent_dropped'])} | "
                 f"{_fmt(r['estimated_dropped'])} | {r['estimate']} | {rec} | "
                 f"{_fmt(r['max_needed_cf'], '.2f')} | {cur} | {cost} |")
  return lines + [""]


class ReportError(ValueError, errors.Refusal):
  """A bad workdir, output folder or setting (one line; moex.report exits 2)."""


def _check(workdir: str, out: str, target_drop: float, recent: int) -> None:
  if not os.path.isdir(workdir):
    raise ReportError(f"--workdir={workdir}: "
                      + ("not a directory" if os.path.exists(workdir) else "no such directory"))
  if not (math.isfinite(target_drop) and 0 <= target_drop < 1):
    raise ReportError(f"--target_drop={target_drop}: must be a fraction in [0, 1)")
  if recent < 1:
    raise ReportError(f"--recent={recent}: must be at least 1 train window")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ReportError(f"--out={out}: is a file, not a folder")
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise ReportError(f"--out={out}: cannot be created ({e.strerror or e})") from None


def write_report(workdir: str, out: str | None = None, target_drop: float = 0.01,
                 recent: int = 20) -> str:
  """Writes the figures and report.md into `out` (default workdir/report); returns the page.

  Only reads the workdir (another run may hold it). report.md is written to a temporary
  file and renamed, so an interrupted report leaves the previous page or the new one.
  ReportError, one line, for a missing workdir, an `out` that is a file, or a bad setting.
  """
  out = out or os.path.join(workdir, workdir_lib.REPORT_DIR)
  _check(workdir, out, target_drop, recent)
  run = read.load_run(workdir)
  lines = [f"# Routing health: `{workdir}`", ""]
  lines += summary_md(summary(run, recent))
  if not run.moe:
    lines += [f"**No MoE statistics**: {workdir_lib.MOE_STATS} is missing or empty.", ""]
  else:
    lines += recommendation_md(capacity.recommend(run, target_drop, recent), target_drop,
                               recent)
  lines += ["## Figures", ""]
  for plot, caption in figures.FIGURES:
    name = plot(run, out)
    if name:
      lines += [f"{caption}", "", f"![{name}]({name})", ""]
  if not run.metrics:
    lines += [f"No {workdir_lib.METRICS} lines: no loss curves.", ""]
  page = os.path.join(out, workdir_lib.REPORT)
  files.write_text(page, "\n".join(lines))
  logging.info("wrote %s", page)
  return page
