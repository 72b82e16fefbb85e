"""The runs a scaling fit reads: finished workdirs (config.json + metrics.jsonl) as points,
read through moex.workdir (its config and its one "finished?").

Each finished run becomes one RunPoint: active and total parameters (moex.model.params
counts, the one count), tokens seen (train.steps x data.batch_size x data.seq_len),
model FLOPs (train_flops_per_token x tokens), its final eval loss (nats per token) and its
family (experts, top-k). Refusals are one line (ScalingError) naming the path.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os

from absl import logging

from moex import errors, workdir as workdir_lib


class ScalingError(ValueError, errors.Refusal):
  """A bad input to moex.scaling; the message is one line naming the file, run or flag."""


@dataclasses.dataclass(frozen=True)
class RunPoint:
  """One finished run, as the fitter sees it."""

  workdir: str
  n_active: float
  n_total: float
  tokens: float
  flops: float
  loss: float
  experts: int  # routed experts per MoE layer; 1 for a dense model
  top_k: int
  data: str  # "tokenizer | source": runs of one fit must share it

  @property
  def expansion(self) -> float:
    """Total over active routed-expert parameters (num_experts / top_k; 1 = dense): the E
    of the joint law."""
    return self.experts / self.top_k

  @property
  def family(self) -> str:
    return "dense" if self.experts == 1 else f"moe E={self.experts} K={self.top_k}"


def candidates(spec: str) -> list[str]:
  """Workdirs named by --runs: a workdir, a sweep root (every directory below it holding
  config.json and metrics.jsonl: workdir_lib.CONFIG, METRICS) or a glob of either; sorted."""
  paths = sorted(glob.glob(spec)) if any(ch in spec for ch in "*?[") else [spec]
  if not paths or not all(os.path.exists(p) for p in paths):
    raise ScalingError(f"--runs={spec}: no such file or directory")
  found = set()
  for p in paths:
    for root, dirs, files in os.walk(p):
      dirs.sort()
      if workdir_lib.CONFIG in files and workdir_lib.METRICS in files:
        found.add(root)
  return sorted(found)


def point(workdir: str) -> RunPoint | None:
  """The run in `workdir` as a RunPoint; None when it has not finished."""
  from moex.model import params  # imports jax: only when reading runs
  from moex.train import flops

  wd = workdir_lib.Workdir(workdir)
  try:
    cfg = wd.validated(check_tokenizer=False)
  except workdir_lib.WorkdirError as e:  # names the file
    raise ScalingError(str(e)) from None
  except ValueError as e:  # a ConfigError: names the key
    raise ScalingError(f"{wd.config_path}: {e}") from None
  final = wd.final_eval(cfg.train.steps)  # the one "finished?" (moex.workdir)
  if final is None:
    return None
  try:
    loss = float(final["loss"])
  except (KeyError, TypeError, ValueError):
    loss = math.nan
  if not math.isfinite(loss):
    raise ScalingError(f"{wd.path / workdir_lib.METRICS}: the final eval loss at step "
                       f"{final.get('step')} is {final.get('loss')!r}, not a finite number; "
                       "leave the run out of --runs")
  counts = params.counts(cfg)
  tokens = float(cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len)
  moe = bool(cfg.model.moe_layers)
  return RunPoint(
      workdir=workdir,
      n_active=float(sum(c.active for c in counts.values())),
      n_total=float(sum(c.total for c in counts.values())),
      tokens=tokens, flops=flops.train_flops_per_token(cfg) * tokens, loss=loss,
      experts=cfg.moe.num_experts if moe else 1, top_k=cfg.moe.top_k if moe else 1,
      data=f"{cfg.data.tokenizer} | {cfg.data.source}")


def read_runs(spec: str) -> list[RunPoint]:
  """The finished runs under --runs=SPEC; refuses no runs, one run and mixed data."""
  dirs = candidates(spec)
  if not dirs:
    raise ScalingError(f"--runs={spec}: no workdir ({workdir_lib.CONFIG} + "
                       f"{workdir_lib.METRICS}) there")
  points, unfinished = [], []
  for d in dirs:
    p = point(d)
    (unfinished.append(d) if p is None else points.append(p))
  if unfinished:
    logging.warning("moex.scaling: skipping %d unfinished run(s): %s", len(unfinished),
                    ", ".join(unfinished))
  if not points:
    raise ScalingError(f"--runs={spec}: no finished run (no eval at train.steps) among "
                       f"{len(dirs)} workdir(s), e.g. {dirs[0]}")
  if len(points) == 1:
    raise ScalingError(f"--runs={spec}: only one finished run ({points[0].workdir}); a fit "
                       "needs several sizes and token budgets")
  first = points[0]
  for p in points[1:]:
    if p.data != first.data:
      raise ScalingError(f"--runs={spec}: mixed tokenizers/data: {p.workdir} has "
                         f"{p.data!r}, {first.workdir} has {first.data!r}; losses are not "
                         "comparable")
  return points
