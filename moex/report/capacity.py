"""Capacity maths: the drop at any capacity factor, and the recommended factor per layer.

Capacity is per sequence, so the drop at a factor cf depends on every (sequence, expert)
load. Records carry `sequence_load_hist`: those pairs binned by the factor each would need
(bins of 0.05), with their loads summed per bin. With C = moex.config.capacity(cf, S, K, E,
min_capacity) rows per sequence of S tokens (the layer's own formula),
  drop(cf) = sum_b max(0, load_sum_b - count_b * C) / sum_b load_sum_b,
exact up to the bin width. S and min_capacity are the record's `tokens_per_group` and
`min_capacity`; records written before those fields use config.json's data.seq_len and
moe.min_capacity. Records older than `sequence_load_hist` get no estimate, nor do records
of a path whose `dispatch.Path.no_capacity_model` says why the model does not apply
(expert choice: each expert takes exactly C tokens, nothing is dropped).

Per layer, the recommendation is the smallest cf on a 1.0..8.0 grid (step 0.05) with
drop(cf) <= target in at least 95% of the recent train windows; the max
`needed_capacity_factor` of the same windows is the exact dropless bound. Expert buffer rows
and expert FLOPs scale linearly with cf, so the cost relative to the current setting is
recommended / current cf. Array letters here: G factors, W windows, B histogram bins.
"""

from __future__ import annotations

import numpy as np

from moex import config as config_lib
from moex.moe import dispatch
from moex.report import read
from moex.report.read import Run

CF_GRID = np.round(np.arange(100, 801, 5) / 100, 2)  # 1.0, 1.05, ..., 8.0
WINDOW_QUANTILE = 0.95  # the share of recent windows the recommendation must satisfy
ESTIMATE = "per-sequence histogram"  # the `estimate` of a row that has one


def group_shape(record: dict, config: dict) -> tuple[int, int] | None:
  """(tokens per sequence S, min_capacity) of a record; config.json's for older records."""
  s = record.get("tokens_per_group") or config.get("data", {}).get("seq_len")
  if not s:
    return None
  default = config.get("moe", {}).get("min_capacity", config_lib.MoEConfig.min_capacity)
  return int(s), int(record.get("min_capacity", default))


def no_estimate(record: dict, config: dict) -> str | None:
  """Why drop(cf) cannot be computed from a record (None: it can)."""
  path = dispatch.PATHS.get(record.get("dispatch"))
  if path is not None and path.no_capacity_model:
    return path.no_capacity_model
  if "sequence_load_hist" not in record:
    return "record predates sequence_load_hist"
  if group_shape(record, config) is None:
    return "tokens per sequence unknown (no tokens_per_group, no data.seq_len)"
  return None


def capacities(cf_Y: np.ndarray, tokens_per_group: int, top_k: int, num_experts: int,
               min_capacity: int) -> np.ndarray:
  """Per-expert rows per sequence at each factor [Y] (moex.config.capacity)."""
  return np.array([config_lib.capacity(float(cf), tokens_per_group, top_k, num_experts,
                                       min_capacity) for cf in cf_Y], np.float64)


def histogram_drop(hist: dict, capacity_Y: np.ndarray) -> np.ndarray:
  """Dropped fraction of one window at each capacity, from its sequence_load_hist: [Y]."""
  count_Q = np.asarray(hist["counts"], np.float64)
  load_Q = np.asarray(hist["load_sums"], np.float64)
  total = load_Q.sum()
  if total <= 0:
    return np.zeros(len(capacity_Y))
  over_YxQ = np.maximum(0.0, load_Q[None] - count_Q[None] * np.asarray(capacity_Y)[:, None])
  return over_YxQ.sum(-1) / total


def drop(record: dict, cf_Y: np.ndarray, config: dict) -> np.ndarray:
  """Dropped fraction of a record's window at each factor: [Y] (check no_estimate first)."""
  s, min_cap = group_shape(record, config)
  cap_Y = capacities(cf_Y, s, record["top_k"], record["num_experts"], min_cap)
  return histogram_drop(record["sequence_load_hist"], cap_Y)


def smallest_cf(drop_YxW: np.ndarray, target: float) -> float | None:
  """Smallest grid cf with drop <= target in >= 95% of the windows (None: above 8.0)."""
  ok_YxW = drop_YxW <= target + 1e-12
  good = np.flatnonzero(ok_YxW.mean(axis=1) >= WINDOW_QUANTILE - 1e-12)
  return float(CF_GRID[good[0]]) if good.size else None


def current_cf(run: Run) -> float | None:
  """The training capacity factor: latest train record, else config.json (None: dropless)."""
  train = read.split(run.moe, "train")
  if train:
    return train[-1].get("capacity_factor")
  moe_cfg = run.config.get("moe", {})
  path = dispatch.PATHS.get(moe_cfg.get("dispatch", "capacity"))
  if path is None or not path.capacity_bound:
    return None
  return moe_cfg.get("capacity_factor")


def recommend(run: Run, target: float, recent: int) -> list[dict]:
  """One row per layer: recommended cf, max needed cf, cost relative to the current cf."""
  cf_now = current_cf(run)
  rows = []
  for layer, rs in read.by_layer(read.split(run.moe, "train")).items():
    rs = rs[-recent:]
    usable = [r for r in rs if no_estimate(r, run.config) is None]
    cf = estimated = None
    if usable:
      cf = smallest_cf(np.stack([drop(r, CF_GRID, run.config) for r in usable], -1), target)
      if cf_now:  # the estimate at the current factor, to compare with the actual drop
        estimated = float(np.mean([drop(r, np.array([cf_now]), run.config)[0]
                                   for r in usable]))
    rows.append({
        "layer": layer,
        "windows": len(usable) if usable else len(rs),
        "recommended_cf": cf,
        "max_needed_cf": read.nan_reduce(
            np.nanmax, [read.num(r.get("needed_capacity_factor")) for r in rs]),
        "current_cf": cf_now,
        "cost": cf / cf_now if (cf is not None and cf_now) else None,
        "recent_dropped": read.nan_reduce(
            np.nanmean, [read.num(r.get("dropped_fraction")) for r in rs]),
        "estimated_dropped": estimated,
        "estimate": ESTIMATE if usable else "n/a, " + no_estimate(rs[-1], run.config),
    })
  return rows
