"""The MoE feed-forward block: router -> dispatch -> experts -> combine, plus its statistics.

Capacity is per group, and a group is one sequence: C = max(ceil(cf * L * K / E),
moe.min_capacity). Groups never span devices, so drops do not depend on the mesh.
Shared experts (DeepSeek) are one always-on SwiGLU of width num_shared_experts * d_shared
added to the routed output (the same function as that many separate experts summed).

On a mesh of more than one device the routed part runs inside `jax.shard_map`
(moex/moe/parallel.py); `moe_forward` is the same code on one device or one shard.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moex.config import ModelConfig, MoEConfig
from moex.model.layers import SwiGLU
from moex.moe import balancing, dispatch, experts as experts_lib, parallel, routing, stats
from moex.parallel import sharding


def dispatch_mode(cfg: MoEConfig, train: bool) -> tuple[str, float | None]:
  """(dispatch path, capacity factor or None) for training or evaluation."""
  if cfg.router == "expert_choice":  # always capacity-bound
    return "capacity", (cfg.capacity_factor if train
                        else cfg.eval_capacity_factor or cfg.capacity_factor)
  if train:
    return cfg.dispatch, (cfg.capacity_factor if cfg.dispatch == "capacity" else None)
  cf = cfg.eval_capacity_factor
  return ("capacity", cf) if cf > 0 else ("dropless", None)


def _router_input(x_BxLxD, cfg: MoEConfig, train: bool, rng) -> jax.Array:
  """Multiplicative jitter U(1 - j, 1 + j) on the router's input, in training only."""
  if not (train and cfg.jitter > 0):
    return x_BxLxD
  noise = jax.random.uniform(jax.random.fold_in(rng, 1), x_BxLxD.shape, jnp.float32,
                             1.0 - cfg.jitter, 1.0 + cfg.jitter)
  return x_BxLxD.astype(jnp.float32) * noise


def moe_forward(router_DxE, bias_E, w: experts_lib.ExpertWeights, x_BxLxD, tokens_BxL, rng,
                *, cfg: MoEConfig, train: bool, ax: parallel.Axes):
  """Routed experts on this device's tokens: (y [B, L, D], stats, first-choice expert of
  each token [B, L], new bias or None)."""
  b, l, _ = x_BxLxD.shape
  logits_BxLxE = jnp.einsum("gsd,de->gse",
                            _router_input(x_BxLxD, cfg, train, rng).astype(jnp.float32),
                            router_DxE.astype(jnp.float32))
  path, cf = dispatch_mode(cfg, train)
  ep_overflow_E = jnp.zeros((cfg.num_experts,), jnp.int32)

  if cfg.router == "expert_choice":
    token_BxExC, weight_BxExC, probs_BxLxE = routing.expert_choice_indices(
        logits_BxLxE, cfg.capacity(l, cf))
    y_BxLxD = dispatch.expert_choice_dispatch(x_BxLxD, token_BxExC, weight_BxExC,
                                              parallel.ep_buffered(w, ax))
    load_BxE = jnp.full((b, cfg.num_experts), token_BxExC.shape[-1], jnp.int32)
    kept_E = jnp.sum(load_BxE, axis=0)
    r = routing.Routing(jnp.zeros((b, l, 0), jnp.int32), jnp.zeros((b, l, 0)), probs_BxLxE,
                        logits_BxLxE)
  else:
    ctx = routing.Context(train=train, rng=jax.random.fold_in(rng, 2), tokens_GxS=tokens_BxL,
                          bias_E=bias_E)
    r = routing.ROUTERS[cfg.router](logits_BxLxE, cfg, ctx)
    load_BxE = balancing.expert_counts(r.expert_index_GxSxK, cfg.num_experts)
    if path == "capacity":
      capacity = cfg.capacity(l, cf)
      priority = r.combine_weight_GxSxK if cfg.drop_policy == "probability" else None
      y_BxLxD, _ = dispatch.capacity_dispatch(x_BxLxD, r, capacity, parallel.ep_buffered(w, ax),
                                              priority, cfg.renormalize_after_drop)
      kept_E = jnp.sum(jnp.minimum(load_BxE, capacity), axis=0)
    elif ax.expert_size > 1:
      y_BxLxD, kept_BxLxK = parallel.ep_dropless_dispatch(
          x_BxLxD, r, w, ax, cfg.grouped_matmul, cfg.ep_buffer_factor)
      dropped_E = jnp.zeros((cfg.num_experts,), jnp.int32).at[
          r.expert_index_GxSxK.reshape(-1)].add((~kept_BxLxK).reshape(-1).astype(jnp.int32))
      kept_E = jnp.sum(load_BxE, axis=0) - dropped_E
      ep_overflow_E = dropped_E
    else:
      grouped = lambda rows, sizes: ax.psum_tensor(
          experts_lib.grouped(w, rows, sizes, cfg.grouped_matmul))
      y_BxLxD, _ = dispatch.dropless_dispatch(x_BxLxD, r, grouped)
      kept_E = jnp.sum(load_BxE, axis=0)

  load_E = ax.psum(jnp.sum(load_BxE, axis=0))
  new_bias = None
  if bias_E is not None and train:  # aux-loss-free balancing, applied after this step
    new_bias = routing.update_bias(bias_E, load_E, cfg.bias_update_rate)
  layer_stats = stats.layer_stats(
      load_BxE, kept_E, cfg.capacity(l, cfg.capacity_factor),
      balancing.router_entropy_sum(r, ax.psum), balancing.load_balance_loss(r, load_E, ax.psum),
      balancing.z_loss(r, ax.psum), balancing.sequence_load_balance_loss(r, load_BxE, ax.psum),
      reduce=ax, ep_overflow_E=ep_overflow_E,
      shape_stats=stats.routing_shape_stats(r.expert_index_GxSxK, r.probs_GxSxE),
      tokens_per_group=l, top_k=cfg.top_k)
  return y_BxLxD, layer_stats, first_choice(r), new_bias


def first_choice(r: routing.Routing) -> jax.Array:
  """Each token's first-choice expert [G, S] (its top router probability for expert choice,
  where tokens make no choice); the probe behind moe_stats' routing_churn."""
  if r.expert_index_GxSxK.shape[-1]:
    return r.expert_index_GxSxK[..., 0].astype(jnp.int32)
  return jnp.argmax(r.probs_GxSxE, axis=-1).astype(jnp.int32)


class MoEBlock(nnx.Module):
  """Mixture-of-experts SwiGLU block; returns (output [B, L, D], per-layer stats).

  The stats include "first_choice" [B, L], each token's first-choice expert: per-token, not
  a count, so moex.train.step.forward takes it out before stats are accumulated.
  """

  def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, rngs: nnx.Rngs):
    self.cfg = moe_cfg
    out_std = model_cfg.init_std / (2 * model_cfg.num_layers) ** 0.5
    self.router = routing.Router(model_cfg.d_model, moe_cfg.num_experts, model_cfg.init_std,
                                 rngs, with_bias=moe_cfg.router == "sigmoid_bias")
    self.experts = experts_lib.Experts(moe_cfg.num_experts, model_cfg.d_model,
                                       moe_cfg.d_expert, model_cfg.init_std, out_std,
                                       jnp.dtype(model_cfg.param_dtype), rngs)
    width = moe_cfg.num_shared_experts * (moe_cfg.d_shared or moe_cfg.d_expert)
    # Assigned once: NNX fixes an attribute as data or static on first assignment.
    self.shared = (SwiGLU(model_cfg.d_model, width, model_cfg, rngs)
                   if moe_cfg.num_shared_experts else None)

  def dispatch_mode(self, train: bool) -> tuple[str, float | None]:
    return dispatch_mode(self.cfg, train)

  def __call__(self, x_BxLxD: jax.Array, *, train: bool, tokens_BxL: jax.Array | None = None,
               rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    b, l, _ = x_BxLxD.shape
    if rng is None or not train:  # evaluation routing is deterministic: a fixed key
      rng = jax.random.PRNGKey(0)
    if tokens_BxL is None:
      tokens_BxL = jnp.zeros((b, l), jnp.int32)
    bias_E = None if self.router.bias_E is None else self.router.bias_E[...]
    args = (self.router.kernel_DxE[...], bias_E, self.experts.weights(), x_BxLxD, tokens_BxL,
            rng)
    fn = functools.partial(moe_forward, cfg=self.cfg, train=train)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      y_BxLxD, layer_stats, first_BxL, new_bias = fn(*args, ax=parallel.Axes())
    else:
      y_BxLxD, layer_stats, first_BxL, new_bias = _sharded(fn, mesh, args,
                                                           bias_E is not None and train)
    if new_bias is not None:
      self.router.bias_E[...] = new_bias
    if self.shared is not None:
      y_BxLxD = y_BxLxD + self.shared(x_BxLxD)
    return y_BxLxD.astype(x_BxLxD.dtype), dict(layer_stats, first_choice=first_BxL)


def _sharded(fn, mesh, args, returns_bias: bool):
  """Runs `fn` under shard_map with the specs the config's rules give."""
  rules = sharding.current_rules()
  if rules is None:
    raise RuntimeError("MoEBlock on a multi-device mesh needs the config's rules: wrap the "
                       "call in `with sharding.use_rules(cfg.mesh.rules)`")
  batch = sharding.mesh_axes("batch", rules, mesh)
  expert = sharding.mesh_axes("expert", rules, mesh)
  tensor = sharding.mesh_axes("expert_mlp", rules, mesh)
  ax = parallel.Axes(batch=batch, expert=expert,
                     expert_size=sharding.split_size("expert", rules, mesh), tensor=tensor,
                     tensor_size=sharding.split_size("expert_mlp", rules, mesh))
  e_spec = expert or None
  t_spec = tensor or None
  b_spec = batch or None
  w_spec = experts_lib.ExpertWeights(P(e_spec, None, t_spec), P(e_spec, None, t_spec),
                                     P(e_spec, t_spec, None))
  bias_spec = None if args[1] is None else P()
  in_specs = (P(), bias_spec, w_spec, P(b_spec, None, None), P(b_spec, None), P())
  out_specs = (P(b_spec, None, None), P(), P(b_spec, None), P() if returns_bias else None)
  return jax.shard_map(functools.partial(fn, ax=ax), mesh=mesh, in_specs=in_specs,
                       out_specs=out_specs)(*args)
