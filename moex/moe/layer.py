"""The MoE feed-forward block: router -> dispatch -> experts -> combine, plus its statistics.

Capacity is per group, and a group is one sequence: C = max(ceil(cf * L * K / E),
moe.min_capacity). Groups never span devices, so drops do not depend on the mesh.
Shared experts (DeepSeek) are one always-on SwiGLU of width num_shared_experts * d_shared
added to the routed output (the same function as that many separate experts summed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moex.config import ModelConfig, MoEConfig
from moex.model.layers import SwiGLU
from moex.moe import balancing, dispatch, routing, stats
from moex.moe.experts import Experts


class MoEBlock(nnx.Module):
  """Mixture-of-experts SwiGLU block; returns (output [B, L, D], per-layer stats)."""

  def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, rngs: nnx.Rngs):
    self.cfg = moe_cfg
    out_std = model_cfg.init_std / (2 * model_cfg.num_layers) ** 0.5
    self.router = routing.Router(model_cfg.d_model, moe_cfg.num_experts, model_cfg.init_std,
                                 rngs, with_bias=moe_cfg.router == "sigmoid_bias")
    self.experts = Experts(moe_cfg.num_experts, model_cfg.d_model, moe_cfg.d_expert,
                           model_cfg.init_std, out_std, jnp.dtype(model_cfg.param_dtype),
                           rngs)
    self.shared = None
    if moe_cfg.num_shared_experts:
      width = moe_cfg.num_shared_experts * (moe_cfg.d_shared or moe_cfg.d_expert)
      self.shared = SwiGLU(model_cfg.d_model, width, model_cfg, rngs)

  def dispatch_mode(self, train: bool) -> tuple[str, float | None]:
    """(dispatch path, capacity factor or None) for training or evaluation."""
    cfg = self.cfg
    if cfg.router == "expert_choice":  # always capacity-bound
      return "capacity", (cfg.eval_capacity_factor or cfg.capacity_factor) if not train \
          else cfg.capacity_factor
    if train:
      cf = cfg.capacity_factor if cfg.dispatch == "capacity" else None
      return cfg.dispatch, cf
    cf = cfg.eval_capacity_factor
    return ("capacity", cf) if cf > 0 else ("dropless", None)

  def _router_input(self, x_BxLxD, train: bool, rng) -> jax.Array:
    """Multiplicative jitter U(1 - j, 1 + j) on the router's input, in training only."""
    if not (train and self.cfg.jitter > 0):
      return x_BxLxD
    j = self.cfg.jitter
    noise = jax.random.uniform(jax.random.fold_in(rng, 1), x_BxLxD.shape, jnp.float32,
                               1.0 - j, 1.0 + j)
    return x_BxLxD.astype(jnp.float32) * noise

  def __call__(self, x_BxLxD: jax.Array, *, train: bool, tokens_BxL: jax.Array | None = None,
               rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    cfg = self.cfg
    b, l, _ = x_BxLxD.shape
    rng = jax.random.PRNGKey(0) if rng is None else rng  # fixed at eval: deterministic
    logits_BxLxE = self.router(self._router_input(x_BxLxD, train, rng))
    path, cf = self.dispatch_mode(train)

    if cfg.router == "expert_choice":
      capacity = cfg.capacity(l, cf)
      token_BxExC, weight_BxExC, probs_BxLxE = routing.expert_choice_indices(
          logits_BxLxE, capacity)
      y_BxLxD = dispatch.expert_choice_dispatch(x_BxLxD, token_BxExC, weight_BxExC,
                                                self.experts.buffered)
      load_BxE = jnp.full((b, cfg.num_experts), token_BxExC.shape[-1], jnp.int32)
      kept_E = jnp.sum(load_BxE, axis=0)
      r = routing.Routing(jnp.zeros((b, l, 0), jnp.int32), jnp.zeros((b, l, 0)),
                          probs_BxLxE, logits_BxLxE)
    else:
      bias_E = None if self.router.bias_E is None else self.router.bias_E[...]
      ctx = routing.Context(train=train, rng=jax.random.fold_in(rng, 2), tokens_GxS=tokens_BxL,
                            bias_E=bias_E)
      r = routing.ROUTERS[cfg.router](logits_BxLxE, cfg, ctx)
      load_BxE = balancing.expert_counts(r.expert_index_GxSxK, cfg.num_experts)
      if path == "capacity":
        capacity = cfg.capacity(l, cf)
        priority = r.combine_weight_GxSxK if cfg.drop_policy == "probability" else None
        y_BxLxD, _ = dispatch.capacity_dispatch(x_BxLxD, r, capacity, self.experts.buffered,
                                                priority, cfg.renormalize_after_drop)
        kept_E = jnp.sum(jnp.minimum(load_BxE, capacity), axis=0)
      else:
        grouped = lambda rows, sizes: self.experts.grouped(rows, sizes, cfg.grouped_matmul)
        y_BxLxD, _ = dispatch.dropless_dispatch(x_BxLxD, r, grouped)
        kept_E = jnp.sum(load_BxE, axis=0)

    if self.shared is not None:
      y_BxLxD = y_BxLxD + self.shared(x_BxLxD)
    load_E = jnp.sum(load_BxE, axis=0)
    if train and self.router.bias_E is not None:  # aux-loss-free balancing, after the step
      self.router.bias_E[...] = routing.update_bias(self.router.bias_E[...], load_E,
                                                    cfg.bias_update_rate)
    layer_stats = stats.layer_stats(
        load_BxE, kept_E, cfg.capacity(l, cfg.capacity_factor),
        balancing.router_entropy_sum(r), balancing.load_balance_loss(r, load_E),
        balancing.z_loss(r), balancing.sequence_load_balance_loss(r, load_BxE))
    return y_BxLxD.astype(x_BxLxD.dtype), layer_stats
