"""Expert parallelism: the MoE layer inside `jax.shard_map`, tokens moved by all-to-all.

Each device routes its own tokens (the batch is split over the `batch` rule's mesh axes),
sends every assignment to the device that holds its expert (experts split over the
`expert` rule's axes, expert e on expert-rank e // E_local), runs its local experts, and
sends the results back. An expert's hidden width may also be split (the `expert_mlp` rule,
usually `tensor`): each shard computes part of the down projection and a psum adds them.

- capacity path: the [E, G*C, D] buffer is already fixed-size, so one all_to_all there and
  one back (`ep_buffered`).
- dropless path: a padded all_to_all with a bounded buffer of B rows per device pair
  (`ep_dropless_dispatch`). B = ceil(ep_buffer_factor * T_local * K / n_ranks), or T_local*K
  (nothing can overflow) when the factor is 0. Assignments past the bound are dropped and
  counted (`ep_overflow` in the statistics), never silently.
  (`jax.lax.ragged_all_to_all` would avoid the padding on GPU/TPU but is not implemented on
  XLA:CPU, where every test runs; it is not used yet.)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moex.moe import dispatch, experts as experts_lib, permute
from moex.moe.routing import Routing


@dataclasses.dataclass(frozen=True)
class Axes:
  """The mesh axes the MoE layer runs over (all empty on one device)."""

  batch: tuple[str, ...] = ()  # tokens are split over these; statistics psum over them
  expert: tuple[str, ...] = ()  # experts are split over these
  expert_size: int = 1
  tensor: tuple[str, ...] = ()  # each expert's hidden width is split over these
  tensor_size: int = 1

  def psum(self, x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, self.batch) if self.batch else x

  def pmax(self, x: jax.Array) -> jax.Array:
    return jax.lax.pmax(x, self.batch) if self.batch else x

  def psum_tensor(self, x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, self.tensor) if self.tensor else x


def _a2a(x: jax.Array, ax: Axes, split_axis: int, concat_axis: int) -> jax.Array:
  return jax.lax.all_to_all(x, ax.expert, split_axis, concat_axis, tiled=True)


def ep_buffered(w: experts_lib.ExpertWeights, ax: Axes):
  """The capacity path's expert callback: [E, R, D] buffers in, through the owners, back."""

  def run(buf_ExRxD: jax.Array) -> jax.Array:
    if ax.expert_size > 1:
      buf_ExRxD = _a2a(buf_ExRxD, ax, 0, 1)  # -> [E_local, n * R, D]
    out = ax.psum_tensor(experts_lib.buffered(w, buf_ExRxD))
    if ax.expert_size > 1:
      out = _a2a(out, ax, 1, 0)  # -> [E, R, D]
    return out

  return run


def pair_capacity(tokens_local: int, top_k: int, ranks: int, factor: float) -> int:
  """Rows each device may send to each other device on the dropless path."""
  if factor <= 0:
    return tokens_local * top_k
  return min(tokens_local * top_k, math.ceil(factor * tokens_local * top_k / ranks))


def ep_dropless_dispatch(x_GxSxD: jax.Array, routing: Routing, w: experts_lib.ExpertWeights,
                         ax: Axes, backend: str, buffer_factor: float):
  """Dropless across devices: padded all_to_all per device pair, grouped matmul at the owner.

  Returns (output [G, S, D], kept [G, S, K]); kept is False only for assignments that
  overflowed the pair buffer.
  """
  g, s, d = x_GxSxD.shape
  k = routing.expert_index_GxSxK.shape[-1]
  n = ax.expert_size
  e_local = w.gate_ExDxF.shape[0]
  t = g * s
  b = pair_capacity(t, k, n, buffer_factor)
  # Stage 1: a capacity dispatch over devices (rank = expert // E_local), one local group.
  expert_1xTxK = routing.expert_index_GxSxK.reshape(1, t, k)
  rank_1xTxK = expert_1xTxK // e_local
  slot_1xTxK = dispatch.capacity_positions(rank_1xTxK, n)
  kept_1xTxK = slot_1xTxK < b
  rows = n * b
  row_TK = jnp.where(kept_1xTxK, rank_1xTxK * b + slot_1xTxK, rows).reshape(t * k)
  assignment_R = jnp.full((rows + 1,), t * k, jnp.int32).at[row_TK].set(
      jnp.arange(t * k, dtype=jnp.int32))[:rows]
  filled_R = assignment_R < t * k
  token_R = jnp.where(filled_R, assignment_R // k, t)
  local_expert_R = jnp.where(filled_R, expert_1xTxK.reshape(t * k)[
      jnp.minimum(assignment_R, t * k - 1)] % e_local, e_local)

  send_RxD = permute.take_rows(x_GxSxD.reshape(t, d), token_R, row_TK.reshape(t, k))
  recv_RxD = _a2a(send_RxD.reshape(n, b, d), ax, 0, 0).reshape(rows, d)
  recv_expert_R = _a2a(local_expert_R.reshape(n, b), ax, 0, 0).reshape(rows)

  # Stage 2: at the owner, sort received rows by local expert (padding, id E_local, last).
  order_R = jnp.argsort(recv_expert_R, stable=True).astype(jnp.int32)
  inverse_R = jnp.argsort(order_R).astype(jnp.int32)
  sorted_RxD = permute.take_rows(recv_RxD, order_R, inverse_R[:, None])
  sizes_E = jnp.bincount(recv_expert_R, length=e_local + 1)[:e_local].astype(jnp.int32)
  if backend == "tiled":  # its layout needs every row in a group: padding rows are zero
    sizes_E = sizes_E.at[-1].add(rows - jnp.sum(sizes_E))
  out_sorted_RxD = ax.psum_tensor(experts_lib.grouped(w, sorted_RxD, sizes_E, backend))
  out_RxD = permute.take_rows(out_sorted_RxD, inverse_R, order_R[:, None])
  back_RxD = _a2a(out_RxD.reshape(n, b, d), ax, 0, 0).reshape(rows, d)

  y_TKxD = permute.take_rows(back_RxD, row_TK, assignment_R[:, None])
  kept_GxSxK = kept_1xTxK.reshape(g, s, k)
  weight_TxK = jnp.where(kept_GxSxK, routing.combine_weight_GxSxK, 0.0).reshape(t, k)
  y_TxD = jnp.einsum("tkd,tk->td", y_TKxD.reshape(t, k, d), weight_TxK.astype(y_TKxD.dtype))
  return y_TxD.reshape(g, s, d), kept_GxSxK
