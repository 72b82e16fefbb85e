"""Grouped matmul: rows [M, D] sorted by group, times that group's weight [D, F].

Backends behind `grouped_matmul(..., backend=)`:
- "ragged_dot": `jax.lax.ragged_dot`. A real grouped kernel on GPU and TPU; on CPU it
  lowers to a masked dense dot over every group (E times the work).
- "tiled": for CPU. Each group is padded to whole tiles of `tile` rows and every tile is
  multiplied by its own group's weight, so only the rows a group owns are computed (plus
  at most one partial tile per group). Static shapes: ceil(M / tile) + E tiles.
- "auto": "ragged_dot" on GPU/TPU, "tiled" on CPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def resolve_backend(backend: str) -> str:
  if backend != "auto":
    return backend
  return "tiled" if jax.default_backend() == "cpu" else "ragged_dot"


def default_tile(num_rows: int, num_groups: int) -> int:
  """A power-of-two tile whose padding bound (E * tile rows) stays near 6% of M."""
  t = 8
  while t < 256 and num_groups * (2 * t) <= 0.0625 * num_rows:
    t *= 2
  return t


class TiledLayout:
  """Where each sorted row goes in the tile-padded buffer, and each tile's group."""

  def __init__(self, group_sizes_E: jax.Array, num_rows: int, tile: int):
    e = group_sizes_E.shape[0]
    self.tile = tile
    self.num_tiles = math.ceil(num_rows / tile) + e
    tiles_E = (group_sizes_E + tile - 1) // tile
    tile_start_E = jnp.cumsum(tiles_E) - tiles_E
    row_start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    row_M = jnp.arange(num_rows, dtype=jnp.int32)
    group_M = jnp.searchsorted(jnp.cumsum(group_sizes_E), row_M, side="right")
    group_M = jnp.minimum(group_M, e - 1).astype(jnp.int32)
    self.padded_pos_M = (tile_start_E[group_M] * tile + row_M - row_start_E[group_M])
    # Tile -> group; unused trailing tiles point at group 0 and hold zero rows.
    tile_N = jnp.arange(self.num_tiles, dtype=jnp.int32)
    used = jnp.sum(tiles_E)
    tile_group_N = jnp.searchsorted(jnp.cumsum(tiles_E), tile_N, side="right")
    self.tile_group_N = jnp.where(tile_N < used, jnp.minimum(tile_group_N, e - 1), 0)

  def pad(self, x_MxD: jax.Array) -> jax.Array:
    """Rows into tile-padded layout [N, tile, D] (padding rows are zero)."""
    d = x_MxD.shape[-1]
    buf = jnp.zeros((self.num_tiles * self.tile, d), x_MxD.dtype)
    buf = buf.at[self.padded_pos_M].set(x_MxD, unique_indices=True)
    return buf.reshape(self.num_tiles, self.tile, d)

  def unpad(self, y_NxTxF: jax.Array) -> jax.Array:
    """Back from the tile-padded layout to the sorted rows [M, F]."""
    return jnp.take(y_NxTxF.reshape(-1, y_NxTxF.shape[-1]), self.padded_pos_M, axis=0)

  def matmul(self, x_NxTxD: jax.Array, w_ExDxF: jax.Array) -> jax.Array:
    """Each tile times its group's weight: [N, tile, F]."""
    w_NxDxF = jnp.take(w_ExDxF, self.tile_group_N, axis=0)
    return jnp.einsum("ntd,ndf->ntf", x_NxTxD, w_NxDxF)


def grouped_matmul(x_MxD: jax.Array, w_ExDxF: jax.Array, group_sizes_E: jax.Array,
                   backend: str = "auto") -> jax.Array:
  """out[m] = x[m] @ w[group of m], rows sorted by group: [M, F]."""
  backend = resolve_backend(backend)
  if backend == "ragged_dot":
    return jax.lax.ragged_dot(x_MxD, w_ExDxF, group_sizes_E)
  if backend == "tiled":
    layout = TiledLayout(group_sizes_E, x_MxD.shape[0],
                         default_tile(x_MxD.shape[0], w_ExDxF.shape[0]))
    return layout.unpad(layout.matmul(layout.pad(x_MxD), w_ExDxF))
  raise ValueError(f"moe.grouped_matmul: unknown backend {backend!r}")
