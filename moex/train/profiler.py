"""A jax.profiler trace of chosen train steps, for TensorBoard's Profile tab.

train.profile_steps = N > 0 traces steps profile_start .. profile_start + N - 1 into
WORKDIR/tensorboard/plugins/profile/<time>/ (an .xplane.pb and a .trace.json.gz), next to
the scalars, so `tensorboard --logdir WORKDIR/tensorboard` shows both (the Profile tab
needs `pip install tensorboard-plugin-profile`; the .trace.json.gz also opens in Perfetto).
Each step runs inside a StepTraceAnnotation, and the trace stops only after the last traced
step's outputs are ready, so the device work of every traced step is inside it. Process 0
traces; the other processes of a multi-process run do the same steps untraced.
"""

from __future__ import annotations

import contextlib
import os

import jax
from absl import logging

from moex.config import TrainConfig
from moex import workdir as workdir_lib


class StepProfiler:
  """Starts the trace before step `start` and stops it after step `start + count - 1`."""

  def __init__(self, cfg: TrainConfig, workdir: str):
    self.start, self.stop = cfg.profile_start, cfg.profile_start + cfg.profile_steps - 1
    self.log_dir = os.fspath(workdir_lib.path(workdir) / workdir_lib.TENSORBOARD)
    self.enabled = cfg.profile_steps > 0 and jax.process_index() == 0
    self.active = False
    if self.enabled and workdir_lib.is_remote(workdir):
      logging.warning("train.profile_steps: the profiler writes local files only; no trace "
                      "for the remote workdir %s", self.log_dir)
      self.enabled = False

  @contextlib.contextmanager
  def step(self, step: int, outputs=lambda: None):
    """Wraps the call that runs train step `step` (1-based); `outputs()` gives what to wait
    for before the trace may stop."""
    if not self.enabled or not self.start <= step <= self.stop:
      yield
      return
    if not self.active:
      logging.info("profiling steps %d-%d into %s", self.start, self.stop, self.log_dir)
      jax.profiler.start_trace(self.log_dir)
      self.active = True
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      yield
    if step == self.stop:
      jax.block_until_ready(outputs())
      self.close()

  def close(self) -> None:
    """Stops a trace still running (a run that ended or stopped inside the traced steps)."""
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profile written to %s (TensorBoard's Profile tab)", self.log_dir)
