"""AdamW with linear warmup, cosine decay and global-norm clipping (all optax)."""

from __future__ import annotations

import jax
import optax

from moex.config import OptConfig


def schedule(cfg: OptConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to peak * min_lr_ratio."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate,
      warmup_steps=min(cfg.warmup_steps, max(total_steps - 1, 0)),
      decay_steps=max(total_steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.min_lr_ratio)


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
