"""Row gathers whose backward pass is also a gather (never a scatter-add).

Dispatch moves rows between token order and expert order. The backward of a plain gather
is a scatter-add, which XLA:CPU runs as a serial loop. Here every gather carries its
inverse map, so the backward gathers the cotangent rows back and sums them (MaxText's
permute/unpermute custom VJP does the same).

`take_rows(x [R, D], index [M], inverse [R, K])`: out[m] = x[index[m]] (zero when
index[m] == R). `inverse[n]` lists the K (or fewer; padded with M) positions m where
index[m] == n; the backward is dx[n] = sum_k dout[inverse[n, k]].

Shape letters: R rows gathered from, M rows gathered, D row width, K the fan-out of an
inverse map: at most K positions share a source row (in dispatch, a token's K assignments;
a caller with another fan-out names its own, e.g. expert choice's inverse_TxE).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pad_row(x_RxD: jax.Array) -> jax.Array:
  return jnp.concatenate([x_RxD, jnp.zeros((1,) + x_RxD.shape[1:], x_RxD.dtype)], axis=0)


def _gather_sum(x_RxD: jax.Array, index_MxK: jax.Array) -> jax.Array:
  """out[m] = sum_k x[index[m, k]], with index R meaning a zero row."""
  rows_MxKxD = jnp.take(_pad_row(x_RxD), index_MxK, axis=0)
  return jnp.sum(rows_MxKxD, axis=1)


@jax.custom_vjp
def take_rows(x_RxD: jax.Array, index_M: jax.Array, inverse_RxK: jax.Array) -> jax.Array:
  return jnp.take(_pad_row(x_RxD), index_M, axis=0)


def varying_axes(x) -> frozenset:
  """Mesh axes `x` varies over inside shard_map (empty outside)."""
  t = jax.typeof(x)
  mat = getattr(t, "manual_axis_type", None)
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(t, "vma", ()))


def like_primal(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """Sums a cotangent over the mesh axes its primal does not vary over, as shard_map's own
  autodiff does for an operand replicated along an axis (e.g. weights along `data`).
  Custom VJPs used inside shard_map must return cotangents typed like their primals."""
  extra = tuple(sorted(varying_axes(ct) - varying_axes(primal)))
  return jax.lax.psum(ct, extra) if extra else ct


def _fwd(x_RxD, index_M, inverse_RxK):
  # x[:0] keeps only x's type (its mesh-axis variance) for the backward pass.
  return take_rows(x_RxD, index_M, inverse_RxK), (index_M, inverse_RxK, x_RxD[:0])


def _bwd(res, dout_MxD):
  index_M, inverse_RxK, x_type = res
  dx_RxD = _gather_sum(dout_MxD, inverse_RxK)
  return like_primal(dx_RxD, x_type), None, None


take_rows.defvjp(_fwd, _bwd)


def inverse_of(index_M: jax.Array, num_sources: int, fanout: int) -> jax.Array:
  """The [R, fanout] inverse of `index_M` for `take_rows` (M pads empty entries).

  Positions mapping to each source n are listed in increasing order; `fanout` must bound
  how many positions share a source. Built with one sort, not a scatter loop.
  """
  m = index_M.shape[0]
  order_M = jnp.argsort(index_M, stable=True)
  sorted_src_M = index_M[order_M]
  first_R = jnp.searchsorted(sorted_src_M, jnp.arange(num_sources), side="left")
  count_R = jnp.searchsorted(sorted_src_M, jnp.arange(num_sources), side="right") - first_R
  k_K = jnp.arange(fanout)
  pos_RxK = jnp.minimum(first_R[:, None] + k_K, m - 1)
  return jnp.where(k_K < count_R[:, None], order_M[pos_RxK], m).astype(jnp.int32)
