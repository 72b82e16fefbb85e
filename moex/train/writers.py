"""Workdir outputs: metrics.jsonl, moe_stats.jsonl and TensorBoard events (process 0 only).

Paths go through etils.epath, so DIR may be local or gs://. Locally a log is one file,
appended to. Remote stores cannot append (gcsfs silently overwrites on mode "a"), so there
each flush writes the new lines as one object NAME.parts/NNNNNNNNN.jsonl; the log is NAME
(if any) followed by its parts in name order (`log_files`).
"""

from __future__ import annotations

import json
import math
import os

import jax
from absl import logging
from etils import epath

from moex import workdir as workdir_lib

METRICS = workdir_lib.METRICS
MOE_STATS = workdir_lib.MOE_STATS
PARTS = workdir_lib.PARTS  # NAME.parts/: the remote form of a log


def _clean(v):
  """JSON has no NaN/Inf: write them as strings so a broken run is still readable."""
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def log_files(path: str | os.PathLike) -> list[epath.Path]:
  """The files that hold one log, in order: NAME, then NAME.parts/* (remote workdirs)."""
  path = epath.Path(path)
  parts = path.parent / (path.name + PARTS)
  files = [path] if path.exists() else []
  if parts.is_dir():
    files += sorted(parts.glob("*.jsonl"), key=lambda p: p.name)
  return files


def truncate_after(path: str | os.PathLike, step: int) -> None:
  """Drops lines logged after `step` (a resumed run recomputes them) and lines that do not
  parse (a torn tail from a killed run, which the next append would run into)."""
  dropped = torn = 0
  for f in log_files(path):
    lines = f.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
      try:
        after = json.loads(line)["step"] > step
      except (ValueError, KeyError, TypeError):
        torn += bool(line.strip())
        continue
      if after:
        dropped += 1
      else:
        kept.append(line if line.endswith("\n") else line + "\n")
    if kept == lines:
      continue
    if not kept and f.parent.name.endswith(PARTS):
      f.unlink()
    elif workdir_lib.is_remote(f):
      f.write_text("".join(kept))  # An object is replaced whole: no partial state.
    else:
      tmp = f.parent / (f.name + ".tmp")
      tmp.write_text("".join(kept))
      tmp.replace(f)
  if dropped or torn:
    logging.warning("%s: dropped %d lines after step %d and %d torn lines (resumed run)",
                    path, dropped, step, torn)


class Writer:
  """Appends JSON lines and TensorBoard scalars; a no-op on processes other than 0.

  `resume_step` None is a fresh start: lines left by an earlier attempt that never
  checkpointed are dropped too, so every step appears once.
  """

  def __init__(self, workdir: str | os.PathLike, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir_lib.path(workdir)
    self.remote = workdir_lib.is_remote(workdir)
    self._tb = None
    self._pending: dict[str, list[str]] = {}
    self._next_part: dict[str, int] = {}
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    for name in (METRICS, MOE_STATS):
      truncate_after(self.workdir / name, -1 if resume_step is None else resume_step)
    if self.remote:
      # tensorboardX would need its own GCS client; the JSON lines hold the same scalars.
      logging.warning("remote workdir %s: no TensorBoard events", self.workdir)
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.fspath(self.workdir / workdir_lib.TENSORBOARD))
    except ImportError:
      logging.warning("tensorboardX not installed: no TensorBoard events")

  def _append(self, name: str, records: list[dict]) -> None:
    lines = [json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in records]
    if self.remote:
      self._pending.setdefault(name, []).extend(lines)
      return
    with (self.workdir / name).open("a") as f:
      f.writelines(lines)

  def _write_parts(self) -> None:
    """Writes each log's pending lines as its next part (remote workdirs)."""
    for name, lines in self._pending.items():
      if not lines:
        continue
      parts = self.workdir / (name + PARTS)
      if name not in self._next_part:  # Listed once per run: parts only grow after that.
        parts.mkdir(parents=True, exist_ok=True)
        stems = [p.name.split(".")[0] for p in parts.glob("*.jsonl")]
        self._next_part[name] = 1 + max((int(s) for s in stems if s.isdigit()), default=0)
      (parts / f"{self._next_part[name]:09d}.jsonl").write_text("".join(lines))
      self._next_part[name] += 1
      lines.clear()

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
    self._write_parts()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    self._write_parts()
    if self._tb is not None:
      self._tb.close()
