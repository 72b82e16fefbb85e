"""Dispatch: move token rows to expert buffers, run the experts, combine the results.

Token-choice paths take tokens [G, S, D] and a Routing and return (output [G, S, D],
kept [G, S, K]). They move rows with `permute.take_rows` (index gathers whose backward is
a gather too), never with one-hot dispatch einsums, which cost as much as the experts.

- capacity: each expert takes at most C assignments per group (sequence). All first
  choices are placed before any second choice; within a choice, by position (earlier
  tokens win) or by probability (batch-prioritized routing: higher weight wins). A dropped
  assignment contributes zero; the survivors keep their weights unless `renormalize`
  rescales them to the token's original total. A token whose every choice is dropped gets
  zero from this block and passes through on the residual.
- dropless: every assignment is computed: rows sorted by expert, then a grouped matmul.
- expert choice: each expert takes its top-C tokens per group (routing.expert_choice_indices).

The expert computation is a callback, so the expert-parallel wrapper can put all-to-alls
around it without touching this file.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from moex.moe import permute
from moex.moe.routing import Routing

# [E, R, D] -> [E, R, D]: every expert applied to its own R buffer rows.
BufferedExperts = Callable[[jax.Array], jax.Array]
# ([M, D] rows sorted by expert, [E] group sizes) -> [M, D].
GroupedExperts = Callable[[jax.Array, jax.Array], jax.Array]


def capacity_positions(expert_index_GxSxK: jax.Array, num_experts: int,
                       priority_GxSxK: jax.Array | None = None) -> jax.Array:
  """Each assignment's slot in its expert's buffer, in priority order: [G, S, K] int32.

  First choices of all tokens come before any second choice. Within a choice, tokens go
  in position order, or by decreasing `priority` when it is given (stable for ties).
  """
  g, s, k = expert_index_GxSxK.shape
  index_GxKxS = expert_index_GxSxK.transpose(0, 2, 1)
  if priority_GxSxK is not None:
    order_GxKxS = jnp.argsort(-priority_GxSxK.transpose(0, 2, 1), axis=-1, stable=True)
    index_GxKxS = jnp.take_along_axis(index_GxKxS, order_GxKxS, axis=-1)
  onehot_GxKSxE = jax.nn.one_hot(index_GxKxS.reshape(g, k * s), num_experts, dtype=jnp.int32)
  slot_GxKSxE = jnp.cumsum(onehot_GxKSxE, axis=1) - 1
  slot_GxKxS = jnp.sum(slot_GxKSxE * onehot_GxKSxE, axis=-1).reshape(g, k, s)
  if priority_GxSxK is not None:
    unorder_GxKxS = jnp.argsort(order_GxKxS, axis=-1)
    slot_GxKxS = jnp.take_along_axis(slot_GxKxS, unorder_GxKxS, axis=-1)
  return slot_GxKxS.transpose(0, 2, 1)


def _combine(y_TxKxD: jax.Array, weight_TxK: jax.Array) -> jax.Array:
  return jnp.einsum("tkd,tk->td", y_TxKxD, weight_TxK.astype(y_TxKxD.dtype))


def renormalized(weight_GxSxK: jax.Array, kept_GxSxK: jax.Array) -> jax.Array:
  """Survivors rescaled so each token keeps its original total weight (0 if all dropped)."""
  kept_w = jnp.where(kept_GxSxK, weight_GxSxK, 0.0)
  total, kept_total = weight_GxSxK.sum(-1, keepdims=True), kept_w.sum(-1, keepdims=True)
  return kept_w * jnp.where(kept_total > 0, total / jnp.maximum(kept_total, 1e-30), 0.0)


def capacity_dispatch(x_GxSxD: jax.Array, routing: Routing, capacity: int,
                      experts: BufferedExperts, priority_GxSxK: jax.Array | None = None,
                      renormalize: bool = False) -> tuple[jax.Array, jax.Array]:
  """Fixed buffers of `capacity` rows per expert and group; overflow is dropped."""
  g, s, d = x_GxSxD.shape
  k = routing.expert_index_GxSxK.shape[-1]
  e = routing.probs_GxSxE.shape[-1]
  c = capacity
  t, rows = g * s, e * g * c
  expert_GxSxK = routing.expert_index_GxSxK
  slot_GxSxK = capacity_positions(expert_GxSxK, e, priority_GxSxK)
  kept_GxSxK = slot_GxSxK < c
  # Buffer rows are ordered (expert, group, slot) so experts see [E, G*C, D] directly;
  # `rows` is the "nowhere" index of dropped assignments.
  group_GxSxK = jnp.arange(g, dtype=jnp.int32)[:, None, None]
  row_TK = jnp.where(kept_GxSxK, expert_GxSxK * (g * c) + group_GxSxK * c + slot_GxSxK,
                     rows).reshape(t * k).astype(jnp.int32)
  # For each buffer row, the assignment (t*K + k) that fills it, or T*K when empty.
  assignment_R = jnp.full((rows + 1,), t * k, jnp.int32).at[row_TK].set(
      jnp.arange(t * k, dtype=jnp.int32), unique_indices=False)[:rows]
  token_R = jnp.where(assignment_R < t * k, assignment_R // k, t)

  x_TxD = x_GxSxD.reshape(t, d)
  buf_RxD = permute.take_rows(x_TxD, token_R, row_TK.reshape(t, k))
  out_RxD = experts(buf_RxD.reshape(e, g * c, d)).reshape(rows, d)
  y_TKxD = permute.take_rows(out_RxD, row_TK, assignment_R[:, None])

  weight_GxSxK = (renormalized(routing.combine_weight_GxSxK, kept_GxSxK) if renormalize
                  else jnp.where(kept_GxSxK, routing.combine_weight_GxSxK, 0.0))
  y_TxD = _combine(y_TKxD.reshape(t, k, d), weight_GxSxK.reshape(t, k))
  return y_TxD.reshape(g, s, d), kept_GxSxK


def dropless_dispatch(x_GxSxD: jax.Array, routing: Routing,
                      experts: GroupedExperts) -> tuple[jax.Array, jax.Array]:
  """Sorts the T*K assignments by expert and runs one grouped matmul; nothing dropped."""
  g, s, d = x_GxSxD.shape
  k = routing.expert_index_GxSxK.shape[-1]
  e = routing.probs_GxSxE.shape[-1]
  t = g * s
  expert_M = routing.expert_index_GxSxK.reshape(t * k)  # M = T*K assignments, token-major.
  order_M = jnp.argsort(expert_M, stable=True).astype(jnp.int32)  # sorted pos -> assignment
  inverse_M = jnp.argsort(order_M).astype(jnp.int32)  # assignment -> sorted pos
  rows_MxD = permute.take_rows(x_GxSxD.reshape(t, d), order_M // k, inverse_M.reshape(t, k))
  group_sizes_E = jnp.bincount(expert_M, length=e).astype(jnp.int32)
  out_MxD = experts(rows_MxD, group_sizes_E)
  y_TKxD = permute.take_rows(out_MxD, inverse_M, order_M[:, None])
  y_TxD = _combine(y_TKxD.reshape(t, k, d), routing.combine_weight_GxSxK.reshape(t, k))
  return y_TxD.reshape(g, s, d), jnp.ones(routing.expert_index_GxSxK.shape, bool)


def expert_choice_dispatch(x_GxSxD: jax.Array, token_GxExC: jax.Array,
                           weight_GxExC: jax.Array, experts: BufferedExperts) -> jax.Array:
  """Each expert's C chosen tokens through that expert, weighted back onto the tokens."""
  g, s, d = x_GxSxD.shape
  _, e, c = token_GxExC.shape
  t = g * s
  src_ExGxC = (token_GxExC + jnp.arange(g, dtype=jnp.int32)[:, None, None] * s
               ).transpose(1, 0, 2)
  src_R = src_ExGxC.reshape(-1)  # buffer row (expert, group, slot) -> token
  inverse_TxE = permute.inverse_of(src_R, t, e)  # a token is taken by at most E experts
  buf_RxD = permute.take_rows(x_GxSxD.reshape(t, d), src_R, inverse_TxE)
  out_RxD = experts(buf_RxD.reshape(e, g * c, d)).reshape(e * g * c, d)
  weight_R = weight_GxExC.transpose(1, 0, 2).reshape(-1, 1).astype(out_RxD.dtype)
  rows = e * g * c
  inverse_TE = inverse_TxE.reshape(-1)
  # Where each buffer row sits in the flat [T*E] inverse (every row sits exactly once).
  where_R = jnp.zeros((rows + 1,), jnp.int32).at[inverse_TE].set(
      jnp.arange(t * e, dtype=jnp.int32))[:rows]
  y_TxD = permute.take_rows(out_RxD * weight_R, inverse_TE, where_R[:, None])
  y_TxD = y_TxD.reshape(t, e, d).sum(axis=1)
  return y_TxD.reshape(g, s, d)
