"""AdamW with linear warmup, cosine or warmup-stable-decay, global-norm clipping (optax)."""

from __future__ import annotations

import jax
import optax

from moex.config import OptConfig


def schedule(cfg: OptConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then opt.schedule's decay to peak * min_lr_ratio."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  end = cfg.learning_rate * cfg.min_lr_ratio
  if cfg.schedule == "wsd":
    return _wsd(cfg.learning_rate, end, warmup, total_steps, cfg.decay_fraction)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, cfg.warmup_steps + 1), end_value=end)


def _wsd(peak: float, end: float, warmup: int, total_steps: int,
         decay_fraction: float) -> optax.Schedule:
  """Warmup-stable-decay (MiniCPM, DeepSeek): warmup, the peak held, a linear decay at the end.

  Only the decay depends on total_steps, so a run extended before its decay began follows
  the same learning rates as if it had been planned that long.
  """
  start = _wsd_decay_start(warmup, total_steps, decay_fraction)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak),
       optax.linear_schedule(peak, end, max(total_steps - start, 1))],
      boundaries=[warmup, start])


def _wsd_decay_start(warmup: int, total_steps: int, decay_fraction: float) -> int:
  return max(total_steps - max(round(decay_fraction * total_steps), 1), warmup)


def decay_start(cfg: OptConfig, total_steps: int) -> int:
  """The step whose learning rate is the first to depend on total_steps."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  if cfg.schedule == "wsd":
    return _wsd_decay_start(warmup, total_steps, cfg.decay_fraction)
  return warmup


def _decay_mask(params):
  """Weight decay on matrices only, never on norm scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make(cfg: OptConfig, total_steps: int) -> tuple[optax.GradientTransformation,
                                                    optax.Schedule]:
  lr = schedule(cfg, total_steps)
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), lr
