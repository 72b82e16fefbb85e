"""Workdir outputs: metrics.jsonl, moe_stats.jsonl and TensorBoard events (process 0 only)."""

from __future__ import annotations

import json
import math
import os

import jax
from absl import logging

METRICS = "metrics.jsonl"
MOE_STATS = "moe_stats.jsonl"


def _clean(v):
  """JSON has no NaN/Inf: write them as strings so a broken run is still readable."""
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def truncate_after(path: str, step: int) -> None:
  """Drops lines logged after `step` (a resumed run recomputes them), keeping the rest."""
  if not os.path.exists(path):
    return
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        if json.loads(line)["step"] > step:
          dropped += 1
          continue
      except (ValueError, KeyError, TypeError):
        pass  # A torn last line from a killed run: keep it out of the way below.
      kept.append(line if line.endswith("\n") else line + "\n")
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
    logging.info("%s: dropped %d lines after step %d (resumed run)", path, dropped, step)


class Writer:
  """Appends JSON lines and TensorBoard scalars; a no-op on processes other than 0."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None:
      for name in (METRICS, MOE_STATS):
        truncate_after(os.path.join(workdir, name), resume_step)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:
      logging.warning("tensorboardX not installed: no TensorBoard events")

  def _append(self, name: str, records: list[dict]) -> None:
    with open(os.path.join(self.workdir, name), "a") as f:
      for r in records:
        f.write(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n")

  def metrics(self, record: dict) -> None:
    if not self.enabled:
      return
    self._append(METRICS, [record])
    if self._tb is not None:
      for k, v in record.items():
        if k not in ("step", "split") and isinstance(v, (int, float)):
          self._tb.add_scalar(f"{record['split']}/{k}", v, record["step"])

  def moe_stats(self, records: list[dict]) -> None:
    if not self.enabled or not records:
      return
    self._append(MOE_STATS, records)
    if self._tb is not None:
      for r in records:
        for k in ("dropped_fraction", "needed_capacity_factor", "router_entropy"):
          self._tb.add_scalar(f"{r['split']}_moe/layer{r['layer']}/{k}", r[k], r["step"])

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
