"""Dispatch: move token rows to expert buffers, run the experts, combine the results.

Both paths take tokens [G, S, D] and a Routing and return (output [G, S, D], kept [G, S, K]).
They use index gathers, never one-hot dispatch einsums (those cost as much as the experts).

- capacity: each expert takes at most C assignments per group (sequence). Priority: all
  first choices before any second choice, and within a choice earlier positions first.
  A dropped assignment contributes zero; the survivors keep their weights. A token whose
  every choice is dropped gets zero from this block and passes through on the residual.
- dropless: every assignment is computed: rows sorted by expert, then a grouped matmul.

The expert computation is a callback so the expert-parallel wrapper can put all-to-alls
around it without touching this file.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from moex.moe.routing import Routing

# [E, R, D] -> [E, R, D]: every expert applied to its own R buffer rows.
BufferedExperts = Callable[[jax.Array], jax.Array]
# ([M, D] rows sorted by expert, [E] group sizes) -> [M, D].
GroupedExperts = Callable[[jax.Array, jax.Array], jax.Array]


def capacity_positions(expert_index_GxSxK: jax.Array, num_experts: int) -> jax.Array:
  """Each assignment's slot in its expert's buffer, in priority order: [G, S, K] int32."""
  g, s, k = expert_index_GxSxK.shape
  # k-major order: the first choices of all tokens come before any second choice.
  index_GxKS = expert_index_GxSxK.transpose(0, 2, 1).reshape(g, k * s)
  onehot_GxKSxE = jax.nn.one_hot(index_GxKS, num_experts, dtype=jnp.int32)
  slot_GxKSxE = jnp.cumsum(onehot_GxKSxE, axis=1) - 1
  slot_GxKS = jnp.sum(slot_GxKSxE * onehot_GxKSxE, axis=-1)
  return slot_GxKS.reshape(g, k, s).transpose(0, 2, 1)


def capacity_dispatch(x_GxSxD: jax.Array, routing: Routing, capacity: int,
                      experts: BufferedExperts) -> tuple[jax.Array, jax.Array]:
  """Fixed buffers of `capacity` rows per expert and group; overflow is dropped."""
  g, s, d = x_GxSxD.shape
  k = routing.expert_index_GxSxK.shape[-1]
  e = routing.probs_GxSxE.shape[-1]
  c = capacity
  expert_GxSxK = routing.expert_index_GxSxK
  slot_GxSxK = capacity_positions(expert_GxSxK, e)
  kept_GxSxK = slot_GxSxK < c
  # Flat buffer position e*C + slot; E*C is the "nowhere" row for dropped assignments.
  nowhere = e * c
  buf_pos_GxSxK = jnp.where(kept_GxSxK, expert_GxSxK * c + slot_GxSxK, nowhere)

  # Which token fills each buffer row (S = the zero padding row when the row is empty).
  token_GxSK = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[:, None], (s, k)).reshape(-1)
  token_GxSK = jnp.broadcast_to(token_GxSK, (g, s * k))
  row_token_GxEC1 = jnp.full((g, e * c + 1), s, jnp.int32)
  row_token_GxEC1 = jax.vmap(lambda r, p, t: r.at[p].set(t))(
      row_token_GxEC1, buf_pos_GxSxK.reshape(g, s * k), token_GxSK)
  row_token_GxEC = row_token_GxEC1[:, :nowhere]

  x_pad_GxS1xD = jnp.concatenate([x_GxSxD, jnp.zeros((g, 1, d), x_GxSxD.dtype)], axis=1)
  buf_GxECxD = jnp.take_along_axis(x_pad_GxS1xD, row_token_GxEC[..., None], axis=1)
  buf_ExGCxD = buf_GxECxD.reshape(g, e, c, d).transpose(1, 0, 2, 3).reshape(e, g * c, d)

  out_ExGCxD = experts(buf_ExGCxD)

  out_GxECxD = out_ExGCxD.reshape(e, g, c, d).transpose(1, 0, 2, 3).reshape(g, e * c, d)
  out_pad_GxEC1xD = jnp.concatenate([out_GxECxD, jnp.zeros((g, 1, d), out_GxECxD.dtype)],
                                    axis=1)
  y_GxSKxD = jnp.take_along_axis(out_pad_GxEC1xD, buf_pos_GxSxK.reshape(g, s * k, 1), axis=1)
  y_GxSxKxD = y_GxSKxD.reshape(g, s, k, d)
  weight_GxSxK = jnp.where(kept_GxSxK, routing.combine_weight_GxSxK, 0.0)
  y_GxSxD = jnp.einsum("gskd,gsk->gsd", y_GxSxKxD, weight_GxSxK.astype(y_GxSxKxD.dtype))
  return y_GxSxD, kept_GxSxK


def dropless_dispatch(x_GxSxD: jax.Array, routing: Routing,
                      experts: GroupedExperts) -> tuple[jax.Array, jax.Array]:
  """Sorts the T*K assignments by expert and runs one grouped matmul; nothing dropped."""
  g, s, d = x_GxSxD.shape
  k = routing.expert_index_GxSxK.shape[-1]
  e = routing.probs_GxSxE.shape[-1]
  expert_M = routing.expert_index_GxSxK.reshape(-1)  # M = G*S*K assignments, token-major.
  order_M = jnp.argsort(expert_M, stable=True)
  inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.size,
                                                                  dtype=order_M.dtype))
  x_TxD = x_GxSxD.reshape(g * s, d)
  rows_MxD = jnp.take(x_TxD, order_M // k, axis=0)
  group_sizes_E = jnp.bincount(expert_M, length=e).astype(jnp.int32)
  out_MxD = experts(rows_MxD, group_sizes_E)
  y_TxKxD = jnp.take(out_MxD, inverse_M, axis=0).reshape(g * s, k, d)
  weight_TxK = routing.combine_weight_GxSxK.reshape(g * s, k).astype(y_TxKxD.dtype)
  y_GxSxD = jnp.einsum("tkd,tk->td", y_TxKxD, weight_TxK).reshape(g, s, d)
  return y_GxSxD, jnp.ones(routing.expert_index_GxSxK.shape, bool)
