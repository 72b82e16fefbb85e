"""Reading a workdir: metrics.jsonl, moe_stats.jsonl and config.json, and record helpers.

Per-expert fields (expert_load, expert_kept, rank_load) are lists up to
`moe.stats_max_experts` experts and summaries above it ({"summary": true, "count", "sum",
"percentiles", "histogram"}), with dead_experts a list or {"count": n}; the helpers here
read either form.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable

import numpy as np
from absl import logging

from moex import workdir as workdir_lib
from moex.train import writers

PROGRESS_LINES = 100_000  # log progress every this many lines read
PERCENTILES = ("0", "5", "25", "50", "75", "95", "100")  # those of a per-expert summary


@dataclasses.dataclass
class Run:
  """What a workdir holds: metric lines, MoE stat lines (deduplicated) and the config."""

  metrics: list[dict]
  moe: list[dict]
  config: dict


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The JSON objects of a log (local or remote, one file or its parts), skipping (with a
  warning) lines that do not parse."""
  files = writers.log_files(path)
  if not files:
    logging.warning("%s: missing", path)
    return []
  out, total = [], 0
  for file in files:
    with file.open("rb") as f:
      for n, raw in enumerate(f, start=1):
        total += 1
        if total % PROGRESS_LINES == 0:
          logging.info("%s: read %d lines", path, total)
        line = raw.decode("utf-8", errors="replace")
        if not line.strip():
          continue
        try:
          rec = json.loads(raw.decode("utf-8"))  # a byte that is not UTF-8: a bad line
        except ValueError:  # UnicodeDecodeError is one
          rec = None
        if not isinstance(rec, dict) or "step" not in rec or "split" not in rec:
          torn = "" if line.endswith("\n") else " (torn last line: still being written?)"
          logging.warning("%s:%d: skipping a bad JSON line%s", file, n, torn)
          continue
        out.append(rec)
  logging.info("%s: %d records", path, len(out))
  return out


def _dedupe(records: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
  """Keeps the last record per key, sorted by step (a killed and resumed run may repeat)."""
  return sorted({key(r): r for r in records}.values(), key=lambda r: r["step"])


def _is_moe_record(r: dict) -> bool:
  """A layer's line with its expert load, written whole (a list) or summarized (large E)."""
  load = r.get("expert_load")
  return "layer" in r and (isinstance(load, list) or is_summary(load))


def load_run(workdir: str) -> Run:
  """The workdir's records (bad lines skipped, repeats deduplicated) and its config (a
  dict; empty, with a warning, when config.json is missing or bad)."""
  wd = workdir_lib.Workdir(workdir)
  metrics = read_jsonl(wd.path / workdir_lib.METRICS)
  moe = [r for r in read_jsonl(wd.path / workdir_lib.MOE_STATS) if _is_moe_record(r)]
  config = {}
  try:
    config = wd.raw_config()
  except workdir_lib.WorkdirError as e:
    logging.warning("%s (the report goes on without the config)", e)
  return Run(metrics=_dedupe(metrics, lambda r: (r["step"], r["split"])),
             moe=_dedupe(moe, lambda r: (r["step"], r["split"], r["layer"])), config=config)


# Values and series.


def num(v) -> float:
  """A float for plotting: null is NaN; the writer stores NaN/Inf as strings."""
  try:
    return float(v)
  except (TypeError, ValueError):
    return math.nan


def nan_reduce(fn: Callable, values) -> float:
  """fn (np.nanmax, np.nanmean) ignoring missing values; NaN when all are missing."""
  vals = np.asarray(values, np.float64)
  return float(fn(vals)) if np.isfinite(vals).any() else math.nan


def split(records: list[dict], name: str) -> list[dict]:
  """The records of one split ("train", "eval")."""
  return [r for r in records if r["split"] == name]


def by_layer(records: list[dict]) -> dict[int, list[dict]]:
  """MoE records grouped by layer, layers in order, each list in step order."""
  out: dict[int, list[dict]] = {}
  for r in records:
    out.setdefault(r["layer"], []).append(r)
  return dict(sorted(out.items()))


def series(records: list[dict], field: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one field, leaving out records that lack it."""
  rs = [r for r in records if field in r]
  return (np.array([r["step"] for r in rs]), np.array([num(r[field]) for r in rs]))


def last(records: list[dict], name: str, field: str) -> float | None:
  """The latest non-null value of a field in one split (None: never logged)."""
  vals = [r[field] for r in split(records, name) if r.get(field) is not None]
  return num(vals[-1]) if vals else None


def latest_train(run: Run) -> dict[int, dict]:
  """The latest train record of each layer."""
  return {layer: rs[-1] for layer, rs in by_layer(split(run.moe, "train")).items()}


# Per-expert fields, whole or summarized.


def is_summary(value) -> bool:
  """Whether a per-expert field was written as a summary (more than stats_max_experts)."""
  return isinstance(value, dict) and bool(value.get("summary"))


def per_expert(value) -> np.ndarray | None:
  """A per-expert list as an array [E]; None for a summary."""
  return None if is_summary(value) else np.asarray(value, np.float64)


def load_share(record: dict) -> np.ndarray | None:
  """Each expert's share of the window's assignments [E]; None when summarized."""
  load_E = per_expert(record["expert_load"])
  if load_E is None:
    return None
  total = load_E.sum()
  return load_E / total if total > 0 else load_E


def share_percentiles(record: dict) -> dict[str, float]:
  """Percentiles over experts of the load share ("0" .. "100"), from a list or a summary."""
  load = record["expert_load"]
  if is_summary(load):
    total, pct = load["sum"], load["percentiles"]
    return {q: pct[q] / total if total > 0 else 0.0 for q in PERCENTILES}
  load_E = np.asarray(load, np.float64)
  share_E = load_E / load_E.sum() if load_E.sum() > 0 else load_E
  return {q: float(np.percentile(share_E, float(q))) for q in PERCENTILES}


def dead_list(record: dict) -> list[int] | None:
  """The experts with no assignment in the window; None when only their count is known."""
  dead = record.get("dead_experts")
  if isinstance(dead, list):
    return dead
  load_E = per_expert(record["expert_load"])
  if dead is None and load_E is not None:  # records older than the dead_experts field
    return np.flatnonzero(load_E == 0).tolist()
  return None


def dead_count(record: dict) -> int:
  """How many of the record's experts had no assignment in its window."""
  dead = record.get("dead_experts")
  if isinstance(dead, dict):
    return int(dead["count"])
  experts = dead_list(record)
  if experts is not None:
    return len(experts)
  # A summary without dead_experts (no writer does this): at least one if the minimum is 0.
  return int(record["expert_load"]["percentiles"]["0"] == 0)


def dead_experts(run: Run) -> dict[int, list[int] | int]:
  """Dead experts of the latest train window per layer with any: their ids, or their count
  when the record summarizes per-expert fields."""
  out = {}
  for layer, r in latest_train(run).items():
    experts = dead_list(r)
    if experts is None and dead_count(r):
      out[layer] = dead_count(r)
    elif experts:
      out[layer] = experts
  return out
