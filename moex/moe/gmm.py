"""Grouped matmul: rows [M, D] sorted by group, times that group's weight [D, F].

Backends behind `grouped_matmul(..., backend=)`:
- "ragged_dot": `jax.lax.ragged_dot`. A real grouped kernel on GPU and TPU; on CPU it
  lowers to a masked dense dot over every group (E times the work).
- "tiled": for CPU. Each group is padded to whole tiles of `tile` rows and every tile is
  multiplied by its own group's weight, so only the rows a group owns are computed (plus
  at most one partial tile per group). Static shapes: ceil(M / tile) + E tiles.
- "chunked": for CPU. Per-expert loops over fixed-size row chunks; the weight is read once
  per expert and only owned chunks run (custom VJP; see below).
- "blocked": for CPU. Each expert's first C = M // E rows (the mean load) go into blocks
  [E, C, D] multiplied by one batched einsum, which XLA:CPU spreads over every core; the
  rows past C (an expert above the mean) run through the "chunked" loops. Executed rows:
  E * C plus the overflow rounded up to chunks; with balanced routing nearly M.
- "megablox": the Pallas TPU grouped-matmul kernel (`jax.experimental.pallas.ops.tpu.
  megablox`, with its own gmm/tgmm backward). Runs in Pallas interpret mode off TPU (slow;
  for tests).
- "auto": "megablox" on TPU when the installed jax has it, "ragged_dot" on GPU (and on TPU
  otherwise), "chunked" on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from moex.moe import permute


def _megablox():
  try:
    from jax.experimental.pallas.ops.tpu.megablox import ops  # pylint: disable=g-import-not-at-top
    return ops
  except ImportError:
    return None


def resolve_backend(backend: str) -> str:
  if backend != "auto":
    return backend
  platform = jax.default_backend()
  if platform == "cpu":
    return "chunked"
  if platform == "tpu" and _megablox() is not None:
    return "megablox"
  return "ragged_dot"


def megablox_gmm(x_MxD: jax.Array, w_ExDxF: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
  """The Pallas megablox kernel; rows padded to its 128-row tiles."""
  ops = _megablox()
  if ops is None:
    raise ValueError("moe.grouped_matmul: megablox is not in this jax installation")
  m, d = x_MxD.shape
  f = w_ExDxF.shape[-1]
  tm = 128
  pad = (-m) % tm
  x = jnp.concatenate([x_MxD, jnp.zeros((pad, d), x_MxD.dtype)]) if pad else x_MxD
  tiling = (tm, min(128, d), min(128, f))
  out = ops.gmm(x, w_ExDxF, group_sizes_E.astype(jnp.int32), x_MxD.dtype, tiling, None,
                None, False, jax.default_backend() != "tpu")
  return out[:m]


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
    tile_Z = jnp.arange(self.num_tiles, dtype=jnp.int32)
    used = jnp.sum(tiles_E)
    tile_group_Z = jnp.searchsorted(jnp.cumsum(tiles_E), tile_Z, side="right")
    self.tile_group_Z = jnp.where(tile_Z < used, jnp.minimum(tile_group_Z, e - 1), 0)

  def pad(self, x_MxD: jax.Array) -> jax.Array:
    """Rows into tile-padded layout [N, tile, D] (padding rows are zero)."""
    d = x_MxD.shape[-1]
    buf = jnp.zeros((self.num_tiles * self.tile, d), x_MxD.dtype)
    buf = buf.at[self.padded_pos_M].set(x_MxD, unique_indices=True)
    return buf.reshape(self.num_tiles, self.tile, d)

  def unpad(self, y_ZxPxF: jax.Array) -> jax.Array:
    """Back from the tile-padded layout to the sorted rows [M, F]."""
    return jnp.take(y_ZxPxF.reshape(-1, y_ZxPxF.shape[-1]), self.padded_pos_M, axis=0)

  def matmul(self, x_ZxPxD: jax.Array, w_ExDxF: jax.Array) -> jax.Array:
    """Each tile times its group's weight: [N, tile, F]."""
    w_ZxDxF = jnp.take(w_ExDxF, self.tile_group_Z, axis=0)
    return jnp.einsum("ntd,ndf->ntf", x_ZxPxD, w_ZxDxF)


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
  if backend == "megablox":
    return megablox_gmm(x_MxD, w_ExDxF, group_sizes_E)
  if backend == "chunked":
    return chunked_gmm(x_MxD, w_ExDxF, group_sizes_E,
                       default_chunk(x_MxD.shape[0], w_ExDxF.shape[0]))
  if backend == "blocked":
    layout = BlockedLayout(group_sizes_E, x_MxD.shape[0])
    return layout.matmul(x_MxD, layout.to_blocks(x_MxD), w_ExDxF, layout.from_blocks)
  raise ValueError(f"moe.grouped_matmul: unknown backend {backend!r}")


# ---------------------------------------------------------------------------------------
# "chunked": per-expert loops over fixed-size row chunks (CPU). Each expert's weight is
# read once per expert, not once per tile, and only the chunks an expert owns run, so the
# work is M + (at most) E * chunk rows. Loops have dynamic trip counts, so the backward
# pass is written by hand (gmm for dx, "transposed gmm" for dw, as in megablox).


def default_chunk(num_rows: int, num_groups: int) -> int:
  """A power-of-two chunk whose expected waste (E * chunk / 2 rows) stays near 5% of M."""
  c = 16
  while c < 256 and num_groups * c <= 0.1 * num_rows:
    c *= 2
  return c


def zeros_like_inputs(shape, dtype, *like):
  """Zeros that vary over the same mesh axes as `like` (loop carries inside shard_map must
  have the type the loop body gives them)."""
  z = jnp.zeros(shape, dtype)
  for a in like:
    z = z + jnp.zeros_like(a.reshape(-1)[0], dtype=dtype)
  return z


def _bounds(group_sizes_E):
  ends_E = jnp.cumsum(group_sizes_E)
  return ends_E - group_sizes_E, ends_E


def _chunked_gmm(x_MxD, w_ExDxF, group_sizes_E, chunk: int, transpose_w: bool = False,
                 skip: int = 0):
  """out[m] = x[m] @ w[g(m)] (or w[g(m)].T), for all but the first `skip` rows of each group
  (those rows are 0). Chunks may run past their group's end into the next group's rows;
  groups are processed in order, so the owner writes last."""
  m, d = x_MxD.shape
  f = w_ExDxF.shape[1] if transpose_w else w_ExDxF.shape[2]
  starts_E, ends_E = _bounds(group_sizes_E)
  starts_E = jnp.minimum(starts_E + skip, ends_E)
  x_pad = jnp.concatenate([x_MxD, jnp.zeros((chunk, d), x_MxD.dtype)])
  out = zeros_like_inputs((m + chunk, f), x_MxD.dtype, x_MxD, w_ExDxF, group_sizes_E)

  def per_group(e, out):
    w_e = w_ExDxF[e].T if transpose_w else w_ExDxF[e]

    def per_chunk(j, out):
      r = starts_E[e] + j * chunk
      x_c = jax.lax.dynamic_slice(x_pad, (r, 0), (chunk, d))
      return jax.lax.dynamic_update_slice(out, (x_c @ w_e).astype(out.dtype), (r, 0))

    return jax.lax.fori_loop(0, (ends_E[e] - starts_E[e] + chunk - 1) // chunk, per_chunk, out)

  out = jax.lax.fori_loop(0, w_ExDxF.shape[0], per_group, out)[:m]
  if skip:  # a chunk past its group's end wrote into the next group's skipped rows
    out = jnp.where(_in_tail(starts_E, ends_E, m)[:, None], out, 0)
  return out


def _in_tail(starts_E, ends_E, num_rows: int) -> jax.Array:
  """Whether each row lies in [starts_E[g], ends_E[g]) of its own group g: [M] bool."""
  row_M = jnp.arange(num_rows, dtype=jnp.int32)
  group_M = jnp.minimum(jnp.searchsorted(ends_E, row_M, side="right"), ends_E.shape[0] - 1)
  return (row_M >= starts_E[group_M]) & (row_M < ends_E[group_M])


def _chunked_tgmm(x_MxD, dy_MxF, group_sizes_E, num_groups: int, chunk: int, skip: int = 0):
  """dw[g] = x[rows of g].T @ dy[rows of g], the first `skip` rows of each group left out:
  [E, D, F]."""
  m, d = x_MxD.shape
  f = dy_MxF.shape[1]
  starts_E, ends_E = _bounds(group_sizes_E)
  starts_E = jnp.minimum(starts_E + skip, ends_E)
  group_sizes_E = ends_E - starts_E
  x_pad = jnp.concatenate([x_MxD, jnp.zeros((chunk, d), x_MxD.dtype)])
  dy_pad = jnp.concatenate([dy_MxF, jnp.zeros((chunk, f), dy_MxF.dtype)])
  rows_P = jnp.arange(chunk)

  def per_group(e, dw):
    def per_chunk(j, acc):
      r = starts_E[e] + j * chunk
      mine = (r + rows_P < ends_E[e])[:, None]  # rows past the group's end belong to others
      x_c = jnp.where(mine, jax.lax.dynamic_slice(x_pad, (r, 0), (chunk, d)), 0)
      dy_c = jax.lax.dynamic_slice(dy_pad, (r, 0), (chunk, f))
      return acc + x_c.T @ dy_c

    acc = jax.lax.fori_loop(
        0, (group_sizes_E[e] + chunk - 1) // chunk, per_chunk,
        zeros_like_inputs((d, f), jnp.float32, x_MxD, dy_MxF, group_sizes_E))
    return dw.at[e].set(acc.astype(dw.dtype))

  return jax.lax.fori_loop(0, num_groups, per_group,
                           zeros_like_inputs((num_groups, d, f), x_MxD.dtype, x_MxD,
                                             dy_MxF, group_sizes_E))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def chunked_gmm(x_MxD, w_ExDxF, group_sizes_E, chunk: int, skip: int = 0):
  """out[m] = x[m] @ w[group of m]; rows among the first `skip` of their group are 0."""
  return _chunked_gmm(x_MxD, w_ExDxF, group_sizes_E, chunk, skip=skip)


def _chunked_fwd(x_MxD, w_ExDxF, group_sizes_E, chunk, skip):
  """With symbolic zeros: each input says whether it is differentiated (`perturbed`), and
  the residuals carry only what the backward pass will compute. A frozen weight (LoRA
  trains only adapters) gets no dw loop at all; XLA does not drop an unused loop."""
  x, w, sizes = x_MxD.value, w_ExDxF.value, group_sizes_E.value
  res = {"w": w, "sizes": sizes}
  if w_ExDxF.perturbed:
    res["x"] = x  # dw needs the inputs
  if x_MxD.perturbed:
    res["dx"] = x[:0]  # a marker (dx is wanted) keeping x's type: its dtype and mesh axes
  return _chunked_gmm(x, w, sizes, chunk, skip=skip), res


def _chunked_bwd(chunk, skip, res, dy_MxF):
  w_ExDxF, group_sizes_E = res["w"], res["sizes"]
  dx = dw = None
  if "dx" in res:
    dx = _chunked_gmm(dy_MxF, w_ExDxF, group_sizes_E, chunk, transpose_w=True, skip=skip)
    dx = permute.like_primal(dx.astype(res["dx"].dtype), res["dx"])
  if "x" in res:
    dw = _chunked_tgmm(res["x"], dy_MxF, group_sizes_E, w_ExDxF.shape[0], chunk, skip=skip)
    dw = permute.like_primal(dw.astype(w_ExDxF.dtype), w_ExDxF)
  return dx, dw, None


chunked_gmm.defvjp(_chunked_fwd, _chunked_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------------
# "blocked": the mean load of every expert as one batched einsum, the rest chunked.


class BlockedLayout:
  """Blocks [E, C, D] holding each group's first C = M // E rows, and the way back.

  Block row (e, j) is sorted row start_e + j when j < size_e, else zero. Rows moved with
  permute.take_rows both ways, so the backward passes are gathers too.
  """

  def __init__(self, group_sizes_E: jax.Array, num_rows: int):
    e = group_sizes_E.shape[0]
    m = num_rows
    self.num_groups, self.num_rows = e, m
    self.capacity = c = max(m // e, 1)
    self.group_sizes_E = group_sizes_E
    self.chunk = default_chunk(m, e)
    starts_E, _ = _bounds(group_sizes_E)
    j_C = jnp.arange(c, dtype=jnp.int32)
    # Block row -> sorted row (m = none): [E * C].
    self.src_R = jnp.where(j_C < group_sizes_E[:, None], starts_E[:, None] + j_C,
                           m).reshape(e * c).astype(jnp.int32)
    row_M = jnp.arange(m, dtype=jnp.int32)
    group_M = jnp.minimum(jnp.searchsorted(jnp.cumsum(group_sizes_E), row_M, side="right"),
                          e - 1).astype(jnp.int32)
    j_M = row_M - starts_E[group_M]
    # Sorted row -> block row (E * C = none: an overflow row, or a row past every group:
    # the dropless path sorts padding last, in no group).
    owned_M = (j_M < c) & (row_M < jnp.sum(group_sizes_E))
    self.dst_M = jnp.where(owned_M, group_M * c + j_M, e * c).astype(jnp.int32)

  def to_blocks(self, x_MxD: jax.Array) -> jax.Array:
    return permute.take_rows(x_MxD, self.src_R, self.dst_M[:, None]).reshape(
        self.num_groups, self.capacity, x_MxD.shape[-1])

  def from_blocks(self, y_ExCxF: jax.Array) -> jax.Array:
    """Block rows back to sorted rows [M, F]; overflow rows are 0."""
    return permute.take_rows(y_ExCxF.reshape(-1, y_ExCxF.shape[-1]), self.dst_M,
                             self.src_R[:, None])

  def overflow(self, x_MxD: jax.Array, w_ExDxF: jax.Array) -> jax.Array:
    """The rows past each group's first C times their group's weight (others 0): [M, F]."""
    return chunked_gmm(x_MxD, w_ExDxF, self.group_sizes_E, self.chunk, self.capacity)

  def matmul(self, x_MxD: jax.Array, x_ExCxD: jax.Array, w_ExDxF: jax.Array,
             back=None) -> jax.Array:
    """x @ w[group] for every row: blocks by einsum, overflow by chunks. Returns the blocks'
    result [E, C, F] and the overflow's [M, F] summed into sorted rows when `back` (e.g.
    from_blocks) is given, else the pair."""
    y_ExCxF = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_ExDxF)
    y_MxF = self.overflow(x_MxD, w_ExDxF)
    return (y_ExCxF, y_MxF) if back is None else back(y_ExCxF) + y_MxF

  def executed_rows(self) -> jax.Array:
    """Rows multiplied: the blocks' E * C plus the overflow in whole chunks."""
    over_E = jnp.maximum(self.group_sizes_E - self.capacity, 0)
    return self.num_groups * self.capacity + chunked_executed_rows(over_E, self.chunk)


def chunked_executed_rows(group_sizes_E, chunk: int) -> jax.Array:
  """Rows the chunked loops actually multiply (XLA's cost analysis counts a loop body once,
  so executed-FLOP accounting for this backend multiplies the body by these trip counts)."""
  return jnp.sum((group_sizes_E + chunk - 1) // chunk) * chunk
