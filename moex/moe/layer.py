"""The MoE feed-forward block: router -> plan -> dispatch -> experts -> combine, plus statistics.

Capacity is per group, and a group is one sequence: C = max(ceil(cf * L * K / E),
moe.min_capacity) (moex.config.capacity). Groups never span devices, so drops do not depend
on the mesh. A packed row (segment ids) is one group: its documents share C, and its
padding (`valid_BxL` False) takes no slot, gets no routed output and counts in no
statistic or balancing term (C stays the full row's). Shared experts (DeepSeek) are one
always-on SwiGLU of width num_shared_experts * d_shared added to the routed output (the
same function as that many separate experts summed).

Each call decides its `dispatch.Plan` once (path, capacity factor, capacity) from the MoE
config, train/eval and the sequence length; the dispatch path is looked up in
`dispatch.PATHS`, and the statistics carry the same plan. On a mesh of more than one device
the routed part runs inside `jax.shard_map` (moex/moe/parallel.py); `moe_forward` is the
same code on one device or one shard.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moex.config import ConfigError, ModelConfig, MoEConfig
from moex.model import lora as lora_lib
from moex.model.layers import SwiGLU
from moex.moe import dispatch, experts as experts_lib, parallel, routing, stats


class MoEOutput(NamedTuple):
  """What an MoE block reports besides its output (stacked over layers by the decoder)."""

  stats: dict  # counts and balancing terms (moex/moe/stats.py layer_stats)
  first_choice_GxS: jax.Array  # each token's first-choice expert: the routing_churn probe


def _router_input(x_GxSxD, cfg: MoEConfig, train: bool, rng) -> jax.Array:
  """Multiplicative jitter U(1 - j, 1 + j) on the router's input, in training only."""
  if not (train and cfg.jitter > 0):
    return x_GxSxD
  noise = jax.random.uniform(jax.random.fold_in(rng, 1), x_GxSxD.shape, jnp.float32,
                             1.0 - cfg.jitter, 1.0 + cfg.jitter)
  return x_GxSxD.astype(jnp.float32) * noise


def moe_forward(router_DxE, bias_E, w: experts_lib.ExpertWeights, x_GxSxD, tokens_GxS, rng,
                valid_GxS=None, *, cfg: MoEConfig, plan: dispatch.Plan, train: bool,
                ax: parallel.Axes):
  """Routed experts on this device's tokens: (y [G, S, D], stats, first-choice expert of
  each token [G, S], new bias or None). `valid_GxS` (None: all real) marks real tokens;
  padding takes no capacity slot, gets no routed output and is in no statistic."""
  logits_GxSxE = jnp.einsum("gsd,de->gse",
                            _router_input(x_GxSxD, cfg, train, rng).astype(jnp.float32),
                            router_DxE.astype(jnp.float32))
  ctx = routing.Context(train=train, rng=jax.random.fold_in(rng, 2), tokens_GxS=tokens_GxS,
                        bias_E=bias_E, capacity=plan.capacity)
  r = routing.ROUTERS[cfg.router](logits_GxSxE, cfg, ctx)
  if valid_GxS is not None:
    r = r._replace(valid_GxS=valid_GxS)
  experts = parallel.experts(w, ax, cfg.grouped_matmul, cfg.ep_buffer_factor)
  y_GxSxD, kept_GxSxK = dispatch.PATHS[plan.path](x_GxSxD, r, plan, experts)
  layer_stats = stats.layer_stats(r, kept_GxSxK, plan, reduce=ax)
  new_bias = None
  if bias_E is not None and train:  # aux-loss-free balancing, applied after this step
    new_bias = routing.update_bias(bias_E, layer_stats["expert_load"], cfg.bias_update_rate)
  return y_GxSxD, layer_stats, r.first_choice_GxS(), new_bias


class MoEBlock(nnx.Module):
  """Mixture-of-experts SwiGLU block; returns (output [B, L, D], MoEOutput)."""

  def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, rngs: nnx.Rngs,
               adapters: lora_lib.Factory | None = None):
    self.cfg = moe_cfg
    out_std = model_cfg.init_std / (2 * model_cfg.num_layers) ** 0.5
    self.router = routing.Router(model_cfg.d_model, moe_cfg.num_experts, model_cfg.init_std,
                                 rngs, with_bias=routing.ROUTERS[moe_cfg.router].has_bias)
    self.experts = experts_lib.Experts(moe_cfg.num_experts, model_cfg.d_model,
                                       moe_cfg.d_expert, model_cfg.init_std, out_std,
                                       jnp.dtype(model_cfg.param_dtype), rngs, adapters)
    width = moe_cfg.num_shared_experts * (moe_cfg.d_shared or moe_cfg.d_expert)
    # Assigned once: NNX fixes an attribute as data or static on first assignment.
    self.shared = (SwiGLU(model_cfg.d_model, width, model_cfg, rngs, adapters, "shared")
                   if moe_cfg.num_shared_experts else None)

  def plan(self, train: bool, tokens_per_group: int, num_tokens: int | None = None
           ) -> dispatch.Plan:
    return dispatch.plan(self.cfg, train, tokens_per_group, num_tokens)

  def __call__(self, x_BxLxD: jax.Array, *, train: bool, tokens_BxL: jax.Array | None = None,
               rng: jax.Array | None = None, valid_BxL: jax.Array | None = None
               ) -> tuple[jax.Array, MoEOutput]:
    """`valid_BxL` marks the real tokens of packed rows (None: every token is real)."""
    b, l, _ = x_BxLxD.shape
    if valid_BxL is not None and not routing.ROUTERS[self.cfg.router].packed_rows:
      raise ConfigError(
          f"moe.router: {self.cfg.router} routes a packed row as a whole, so a document's "
          "routing would see the other documents and the padding of its row; use a "
          "token-choice router with batches that carry segment_ids")
    if rng is None or not train:  # evaluation routing is deterministic: a fixed key
      rng = jax.random.PRNGKey(0)
    if tokens_BxL is None:
      tokens_BxL = jnp.zeros((b, l), jnp.int32)
    bias_E = None if self.router.bias_E is None else self.router.bias_E[...]
    args = (self.router.kernel_DxE[...], bias_E, self.experts.weights(), x_BxLxD, tokens_BxL,
            rng, valid_BxL)
    # A group is one sequence: G = B, S = L.
    fn = functools.partial(moe_forward, cfg=self.cfg, plan=self.plan(train, l, b * l),
                           train=train)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      y_BxLxD, layer_stats, first_BxL, new_bias = fn(*args, ax=parallel.Axes())
    else:
      y_BxLxD, layer_stats, first_BxL, new_bias = parallel.shard_moe(
          fn, mesh, args, returns_bias=bias_E is not None and train)
    if new_bias is not None:
      self.router.bias_E[...] = new_bias
    if self.shared is not None:
      y_BxLxD = y_BxLxD + self.shared(x_BxLxD)
    return y_BxLxD.astype(x_BxLxD.dtype), MoEOutput(layer_stats, first_BxL)
