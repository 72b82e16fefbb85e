"""The routed experts: E SwiGLU feed-forward blocks with weights [E, D, F] and [E, F, D].

The module only holds the parameters; the math is in pure functions of an `ExpertWeights`
so the expert-parallel wrapper can call them on its local shard inside shard_map.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moex.moe import gmm


class ExpertWeights(NamedTuple):
  """The routed experts' weights (all E, or this device's E_local inside shard_map)."""

  gate_ExDxF: jax.Array
  up_ExDxF: jax.Array
  down_ExFxD: jax.Array

  def astype(self, dtype) -> "ExpertWeights":
    return ExpertWeights(*(w.astype(dtype) for w in self))


# Logical axis names of each weight, in ExpertWeights order: the parameters' shardings
# (moex/parallel/sharding.py) and the MoE shard_map's specs (moex/moe/parallel.py) use these.
LOGICAL_AXES = ExpertWeights(("expert", "embed", "expert_mlp"), ("expert", "embed", "expert_mlp"),
                             ("expert", "expert_mlp", "embed"))


def buffered(w: ExpertWeights, x_ExRxD: jax.Array) -> jax.Array:
  """Expert e applied to its R buffer rows: [E, R, D]."""
  w = w.astype(x_ExRxD.dtype)
  g = jnp.einsum("erd,edf->erf", x_ExRxD, w.gate_ExDxF)
  u = jnp.einsum("erd,edf->erf", x_ExRxD, w.up_ExDxF)
  return jnp.einsum("erf,efd->erd", jax.nn.silu(g) * u, w.down_ExFxD)


def grouped(w: ExpertWeights, x_MxD: jax.Array, group_sizes_E: jax.Array,
            backend: str) -> jax.Array:
  """Rows sorted by expert, group_sizes_E rows each: [M, D]."""
  w = w.astype(x_MxD.dtype)
  backend = gmm.resolve_backend(backend)
  if backend == "tiled":  # Pad once; all three matmuls run in the tiled layout.
    layout = gmm.TiledLayout(group_sizes_E, x_MxD.shape[0],
                             gmm.default_tile(x_MxD.shape[0], w.gate_ExDxF.shape[0]))
    x_ZxPxD = layout.pad(x_MxD)
    h = jax.nn.silu(layout.matmul(x_ZxPxD, w.gate_ExDxF)) * layout.matmul(x_ZxPxD, w.up_ExDxF)
    return layout.unpad(layout.matmul(h, w.down_ExFxD))
  if backend == "blocked":  # Blocks built once; the hidden rows stay in both layouts.
    layout = gmm.BlockedLayout(group_sizes_E, x_MxD.shape[0])
    g_ExCxF, g_MxF = layout.matmul(x_MxD, layout.to_blocks(x_MxD), w.gate_ExDxF)
    u_ExCxF, u_MxF = layout.matmul(x_MxD, layout.to_blocks(x_MxD), w.up_ExDxF)
    h_ExCxF, h_MxF = jax.nn.silu(g_ExCxF) * u_ExCxF, jax.nn.silu(g_MxF) * u_MxF
    y_ExCxD = jnp.einsum("ecf,efd->ecd", h_ExCxF, w.down_ExFxD)
    return layout.from_blocks(y_ExCxD) + layout.overflow(h_MxF, w.down_ExFxD)
  g = gmm.grouped_matmul(x_MxD, w.gate_ExDxF, group_sizes_E, backend)
  u = gmm.grouped_matmul(x_MxD, w.up_ExDxF, group_sizes_E, backend)
  return gmm.grouped_matmul(jax.nn.silu(g) * u, w.down_ExFxD, group_sizes_E, backend)


# Weight rows copied per inner step of `gathered`: about this many bytes, so the copy of an
# expert's slice stays in cache while the matrix-vector product reads it (2-8 MiB measured
# best on the 2-core CPU, L2 2 MiB per core, L3 32 MiB).
GATHER_CHUNK_BYTES = 4 << 20


def _chunk_rows(rows: int, row_bytes: int) -> int:
  """The largest divisor of `rows` whose chunk of rows fits GATHER_CHUNK_BYTES (>= 1)."""
  target = max(1, GATHER_CHUNK_BYTES // max(row_bytes, 1))
  return max(c for c in range(1, min(rows, target) + 1) if rows % c == 0)


def _gathered_matvec(x_MxR: jax.Array, w_ExRxC: jax.Array, expert_M: jax.Array) -> jax.Array:
  """Row m of x times expert expert_M[m]'s [R, C] matrix, reading only those matrices:
  [M, C]. Chunk by chunk of rows (outer loop), row by row (inner loop)."""
  m, r = x_MxR.shape
  c = w_ExRxC.shape[2]
  n = _chunk_rows(r, c * w_ExRxC.dtype.itemsize)

  def chunk(i, acc_MxC):
    def row(j, acc_MxC):
      x_1xN = jax.lax.dynamic_slice(x_MxR, (j, i * n), (1, n))
      w_NxC = jax.lax.dynamic_slice(w_ExRxC, (expert_M[j], i * n, 0), (1, n, c))[0]
      y_1xC = jax.lax.dynamic_slice(acc_MxC, (j, 0), (1, c)) + x_1xN @ w_NxC
      return jax.lax.dynamic_update_slice(acc_MxC, y_1xC, (j, 0))

    return jax.lax.fori_loop(0, m, row, acc_MxC)

  # Loop carries vary over the mesh axes their inputs vary over (inside shard_map).
  zeros_MxC = gmm.zeros_like_inputs((m, c), x_MxR.dtype, x_MxR, w_ExRxC, expert_M)
  return jax.lax.fori_loop(0, r // n, chunk, zeros_MxC)


def gathered(w: ExpertWeights, x_MxD: jax.Array, expert_M: jax.Array) -> jax.Array:
  """Row m through expert expert_M[m], reading only the named experts' weights: [M, D].

  For a handful of rows (a decode step). XLA:CPU copies a dynamic slice before a matrix
  product reads it, so each expert's weights are copied a chunk of rows at a time (about
  GATHER_CHUNK_BYTES, which stays in cache) inside loops; unrolled, XLA rewrote such
  products into slow reductions.
  """
  w = w.astype(x_MxD.dtype)
  h_MxF = (jax.nn.silu(_gathered_matvec(x_MxD, w.gate_ExDxF, expert_M))
           * _gathered_matvec(x_MxD, w.up_ExDxF, expert_M))
  return _gathered_matvec(h_MxF, w.down_ExFxD, expert_M)


class Experts(nnx.Module):
  """E independent SwiGLU experts' parameters."""

  def __init__(self, num_experts: int, d_model: int, d_expert: int, init_std: float,
               out_std: float, param_dtype, rngs: nnx.Rngs):
    e, d, f = num_experts, d_model, d_expert
    init, out_init = nnx.initializers.normal(init_std), nnx.initializers.normal(out_std)
    names = LOGICAL_AXES
    self.gate_ExDxF = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                                out_sharding=names.gate_ExDxF)
    self.up_ExDxF = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                              out_sharding=names.up_ExDxF)
    self.down_ExFxD = nnx.Param(out_init(rngs.params(), (e, f, d), param_dtype),
                                out_sharding=names.down_ExFxD)

  def weights(self) -> ExpertWeights:
    return ExpertWeights(self.gate_ExDxF[...], self.up_ExDxF[...], self.down_ExFxD[...])

  # Convenience for single-device use (tests, benchmarks).
  def buffered(self, x_ExRxD: jax.Array) -> jax.Array:
    return buffered(self.weights(), x_ExRxD)

  def grouped(self, x_MxD: jax.Array, group_sizes_E: jax.Array, backend: str) -> jax.Array:
    return grouped(self.weights(), x_MxD, group_sizes_E, backend)
