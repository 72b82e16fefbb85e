"""Auxiliary balancing terms computed from a Routing (float32, over every token given)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moex.moe.routing import Routing


def expert_counts(expert_index_GxSxK: jax.Array, num_experts: int) -> jax.Array:
  """Assignments routed to each expert in each group, before any dropping: [G, E] int32."""
  g = expert_index_GxSxK.shape[0]
  flat_GxSK = expert_index_GxSxK.reshape(g, -1)
  return jax.vmap(lambda i: jnp.bincount(i, length=num_experts))(flat_GxSK).astype(jnp.int32)


def load_balance_loss(routing: Routing, load_E: jax.Array) -> jax.Array:
  """Switch Transformer loss over all K choices: E * sum_e f_e * P_e (1.0 when uniform).

  f_e is the fraction of the T*K assignments routed to expert e (Megatron-Core's
  `switch_load_balancing_loss_func`); P_e the mean router probability of e over tokens.
  """
  e = routing.probs_GxSxE.shape[-1]
  f_E = load_E.astype(jnp.float32) / jnp.maximum(jnp.sum(load_E), 1)
  p_E = jnp.mean(routing.probs_GxSxE.reshape(-1, e), axis=0)
  return e * jnp.sum(jax.lax.stop_gradient(f_E) * p_E)


def sequence_load_balance_loss(routing: Routing, load_GxE: jax.Array) -> jax.Array:
  """The Switch loss computed within each sequence (group), then averaged over sequences.

  Penalizes imbalance inside a sequence even when the batch as a whole is balanced
  (DeepSeek-V3's complementary sequence-wise balance loss).
  """
  e = routing.probs_GxSxE.shape[-1]
  f_GxE = load_GxE.astype(jnp.float32) / jnp.maximum(jnp.sum(load_GxE, -1, keepdims=True), 1)
  p_GxE = jnp.mean(routing.probs_GxSxE, axis=1)
  return jnp.mean(e * jnp.sum(jax.lax.stop_gradient(f_GxE) * p_GxE, axis=-1))


def z_loss(routing: Routing) -> jax.Array:
  """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
  return jnp.mean(jax.nn.logsumexp(routing.logits_GxSxE, axis=-1) ** 2)


def router_entropy_sum(routing: Routing) -> jax.Array:
  """Sum over tokens of the entropy (nats) of the router's distribution over all experts."""
  p = routing.probs_GxSxE
  return -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)))
