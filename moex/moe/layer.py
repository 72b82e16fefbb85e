"""The MoE feed-forward block: router -> dispatch -> experts -> combine, plus its statistics.

Capacity is per group, and a group is one sequence: C = max(ceil(cf * L * K / E),
moe.min_capacity). Groups never span devices, so drops do not depend on the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moex.config import ModelConfig, MoEConfig
from moex.moe import balancing, dispatch, routing, stats
from moex.moe.experts import Experts


class MoEBlock(nnx.Module):
  """Mixture-of-experts SwiGLU block; returns (output [B, L, D], per-layer stats)."""

  def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, rngs: nnx.Rngs):
    self.cfg = moe_cfg
    out_std = model_cfg.init_std / (2 * model_cfg.num_layers) ** 0.5
    self.router = routing.Router(model_cfg.d_model, moe_cfg.num_experts, model_cfg.init_std,
                                 rngs)
    self.experts = Experts(moe_cfg.num_experts, model_cfg.d_model, moe_cfg.d_expert,
                           model_cfg.init_std, out_std, jnp.dtype(model_cfg.param_dtype),
                           rngs)

  def dispatch_mode(self, train: bool) -> tuple[str, float | None]:
    """(dispatch path, capacity factor or None) for training or evaluation."""
    if train:
      cf = self.cfg.capacity_factor if self.cfg.dispatch == "capacity" else None
      return self.cfg.dispatch, cf
    cf = self.cfg.eval_capacity_factor
    return ("capacity", cf) if cf > 0 else ("dropless", None)

  def __call__(self, x_BxLxD: jax.Array, *, train: bool) -> tuple[jax.Array, dict]:
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    logits_BxLxE = self.router(x_BxLxD)
    r = routing.ROUTERS[cfg.router](logits_BxLxE, cfg.top_k)
    load_BxE = balancing.expert_counts(r.expert_index_GxSxK, cfg.num_experts)

    path, cf = self.dispatch_mode(train)
    if path == "capacity":
      capacity = cfg.capacity(l, cf)
      y_BxLxD, _ = dispatch.capacity_dispatch(x_BxLxD, r, capacity, self.experts.buffered)
      kept_E = jnp.sum(jnp.minimum(load_BxE, capacity), axis=0)
    else:
      grouped = lambda rows, sizes: self.experts.grouped(rows, sizes, cfg.grouped_matmul)
      y_BxLxD, _ = dispatch.dropless_dispatch(x_BxLxD, r, grouped)
      kept_E = jnp.sum(load_BxE, axis=0)

    load_E = jnp.sum(load_BxE, axis=0)
    lb = balancing.load_balance_loss(r, load_E)
    z = balancing.z_loss(r)
    layer_stats = stats.layer_stats(load_BxE, kept_E, cfg.capacity(l, cfg.capacity_factor),
                                    balancing.router_entropy_sum(r), lb, z)
    return y_BxLxD.astype(x_BxLxD.dtype), layer_stats
