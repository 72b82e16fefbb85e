"""moex/train/optimizer.py: the learning-rate schedules."""

import dataclasses

import numpy as np
import pytest

from experiments import tiny
from moex import config as config_lib
from moex.train import optimizer


def _opt(**changes) -> config_lib.OptConfig:
  cd = tiny.get_config()
  for k, v in changes.items():
    cd.opt[k] = v
  return config_lib.validate(cd, vocab_size=259).opt


def _lrs(cfg: config_lib.OptConfig, total: int, steps: int) -> np.ndarray:
  return np.asarray([float(optimizer.schedule(cfg, total)(s)) for s in range(steps)])


def test_wsd_extension_leaves_every_step_before_the_old_decay_unchanged():
  cfg = _opt(schedule="wsd", warmup_steps=5, decay_fraction=0.2)
  short, long = _lrs(cfg, 20, 20), _lrs(cfg, 40, 40)
  old_decay_start = 20 - 4
  np.testing.assert_array_equal(short[:old_decay_start], long[:old_decay_start])
  # Its shape: linear warmup, the peak held, then a linear decay to the floor at the end.
  np.testing.assert_allclose(long[:6], cfg.learning_rate * np.arange(6) / 5, rtol=1e-6)
  np.testing.assert_allclose(long[5:32], cfg.learning_rate, rtol=1e-6)
  assert np.all(np.diff(long[32:]) < 0)
  assert float(optimizer.schedule(cfg, 40)(40)) == pytest.approx(
      cfg.learning_rate * cfg.min_lr_ratio, rel=1e-6)


def test_cosine_extension_changes_the_steps_already_planned():
  """Why wsd exists: cosine stretches its decay over the new total."""
  cfg = _opt(warmup_steps=5)
  short, long = _lrs(cfg, 20, 20), _lrs(cfg, 40, 40)
  assert not np.allclose(short[6:16], long[6:16])


def test_wsd_short_runs_keep_warmup_and_decay_in_range():
  cfg = _opt(schedule="wsd", warmup_steps=50, decay_fraction=0.5)
  lrs = _lrs(cfg, 4, 5)
  assert np.all(np.isfinite(lrs)) and np.all(lrs >= 0)
  assert lrs.max() <= cfg.learning_rate * (1 + 1e-6)


def test_old_configs_without_the_schedule_fields_get_cosine():
  cd = tiny.get_config()
  with cd.unlocked():
    del cd.opt["schedule"]
    del cd.opt["decay_fraction"]
  cfg = config_lib.validate(cd, vocab_size=259).opt
  assert (cfg.schedule, cfg.decay_fraction) == ("cosine", 0.2)
  default = dataclasses.replace(cfg, schedule="cosine")
  np.testing.assert_array_equal(_lrs(cfg, 20, 20), _lrs(default, 20, 20))
