"""Auxiliary balancing terms computed from a Routing (float32).

Each term is defined over the global batch. Inside the expert-parallel shard_map every
device sees only its tokens, so the sums go through `psum` (a psum over the batch mesh
axes; the identity on one device) and the result is the same on any mesh.

Padding of packed rows (`routing.valid_GxS` False) is left out of every term: sums run
over real tokens and means divide by their number.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from moex.moe.routing import Routing

Reduce = Callable[[jax.Array], jax.Array]


def _identity(x):
  return x


def real_only(x: jax.Array, routing: Routing) -> jax.Array:  # x: [G, S, ...]
  """x with padding tokens' entries zeroed (x itself when every token is real)."""
  if routing.valid_GxS is None:
    return x
  valid = routing.valid_GxS.reshape(routing.valid_GxS.shape + (1,) * (x.ndim - 2))
  return jnp.where(valid, x, jnp.zeros((), x.dtype))


def expert_counts(expert_index_GxSxK: jax.Array, num_experts: int,
                  valid_GxS: jax.Array | None = None) -> jax.Array:
  """Assignments routed to each expert in each group, before any dropping: [G, E] int32
  (real tokens only when `valid_GxS` is given)."""
  g = expert_index_GxSxK.shape[0]
  if valid_GxS is not None:  # bincount drops the out-of-range expert id
    expert_index_GxSxK = jnp.where(valid_GxS[..., None], expert_index_GxSxK, num_experts)
  flat_GxSK = expert_index_GxSxK.reshape(g, -1)
  return jax.vmap(lambda i: jnp.bincount(i, length=num_experts))(flat_GxSK).astype(jnp.int32)


def routed_load(routing: Routing) -> jax.Array:
  """Assignments routed to each expert in each group, before dropping: [G, E] int32 (for
  expert choice every expert fills its C slots)."""
  g, _, e = routing.probs_GxSxE.shape
  if routing.expert_choice:
    return jnp.full((g, e), routing.token_GxExC.shape[-1], jnp.int32)
  return expert_counts(routing.expert_index_GxSxK, e, routing.valid_GxS)


def _tokens(routing: Routing, psum: Reduce) -> jax.Array:
  """The global number of (real) tokens, float32; at least 1 with padding (a batch of
  padding only gives zero terms, not NaN)."""
  if routing.valid_GxS is not None:
    return jnp.maximum(psum(jnp.sum(routing.valid_GxS).astype(jnp.float32)), 1.0)
  return psum(jnp.asarray(routing.probs_GxSxE.shape[0] * routing.probs_GxSxE.shape[1],
                          jnp.float32))


def load_balance_loss(routing: Routing, load_E: jax.Array, psum: Reduce = _identity):
  """Switch Transformer loss over all K choices: E * sum_e f_e * P_e (1.0 when uniform).

  f_e is the fraction of all assignments routed to expert e (`load_E` must already be the
  global count; Megatron-Core's `switch_load_balancing_loss_func`); P_e the mean router
  probability of e over all tokens.
  """
  e = routing.probs_GxSxE.shape[-1]
  f_E = load_E.astype(jnp.float32) / jnp.maximum(jnp.sum(load_E), 1)
  p_E = (psum(jnp.sum(real_only(routing.probs_GxSxE, routing).reshape(-1, e), axis=0))
         / _tokens(routing, psum))
  return e * jnp.sum(jax.lax.stop_gradient(f_E) * p_E)


def sequence_load_balance_loss(routing: Routing, load_GxE: jax.Array,
                               psum: Reduce = _identity) -> jax.Array:
  """The Switch loss computed within each sequence (group), then averaged over sequences.

  Penalizes imbalance inside a sequence even when the batch as a whole is balanced
  (DeepSeek-V3's complementary sequence-wise balance loss). A packed row is one sequence
  here (its real tokens; rows of padding only are left out of the mean).
  """
  e = routing.probs_GxSxE.shape[-1]
  f_GxE = load_GxE.astype(jnp.float32) / jnp.maximum(jnp.sum(load_GxE, -1, keepdims=True), 1)
  if routing.valid_GxS is None:
    p_GxE = jnp.mean(routing.probs_GxSxE, axis=1)
    rows = jnp.asarray(routing.probs_GxSxE.shape[0], jnp.float32)
  else:
    real_G = jnp.sum(routing.valid_GxS, axis=1).astype(jnp.float32)
    p_GxE = jnp.sum(real_only(routing.probs_GxSxE, routing), axis=1) / jnp.maximum(
        real_G, 1.0)[:, None]
    rows = jnp.sum(real_G > 0).astype(jnp.float32)
  per_seq_G = e * jnp.sum(jax.lax.stop_gradient(f_GxE) * p_GxE, axis=-1)
  if routing.valid_GxS is None:
    return psum(jnp.sum(per_seq_G)) / psum(rows)
  return psum(jnp.sum(per_seq_G)) / jnp.maximum(psum(rows), 1.0)


def z_loss(routing: Routing, psum: Reduce = _identity) -> jax.Array:
  """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2."""
  lse_GxS = jax.nn.logsumexp(routing.logits_GxSxE, axis=-1)
  return psum(jnp.sum(real_only(lse_GxS ** 2, routing))) / _tokens(routing, psum)


def router_entropy_sum(routing: Routing, psum: Reduce = _identity) -> jax.Array:
  """Sum over tokens of the entropy (nats) of the router's distribution over all experts."""
  p = routing.probs_GxSxE
  return psum(-jnp.sum(real_only(p * jnp.log(jnp.maximum(p, 1e-30)), routing)))
