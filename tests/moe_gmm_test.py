"""Tests for moex/moe/gmm.py: both grouped-matmul backends against a numpy loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moex.moe import gmm

nnx.use_eager_sharding(False)


D, F = 16, 32
BACKENDS = ("ragged_dot", "tiled", "chunked", "blocked", "megablox")
GROUP_SIZES = {
    "empty_groups": [3, 0, 5, 0],  # an empty group inside and one at the end
    "leading_empty": [0, 0, 7, 6],
    "one_group_all_rows": [0, 0, 13, 0],  # 13 rows: not a multiple of the tile (8)
    "uneven": [1, 9, 2, 0, 11],  # 23 rows, a partial tile in almost every group
    "single_rows": [1, 1, 1, 1],
}

grouped_matmul = jax.jit(gmm.grouped_matmul, static_argnums=(3,))


def _numpy_gmm(x_MxD, w_ExDxF, sizes_E):
  x, w = np.asarray(x_MxD, np.float64), np.asarray(w_ExDxF, np.float64)
  out = np.zeros((x.shape[0], w.shape[-1]))
  start = 0
  for e, n in enumerate(sizes_E):
    for m in range(start, start + n):
      out[m] = x[m] @ w[e]
    start += n
  return out


def _inputs(sizes_E, seed=0):
  rng = np.random.default_rng(seed)
  m, e = int(sum(sizes_E)), len(sizes_E)
  x = jnp.asarray(rng.normal(size=(m, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(e, D, F)), jnp.float32)
  return x, w, jnp.asarray(sizes_E, jnp.int32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(GROUP_SIZES))
def test_grouped_matmul_matches_loop(backend, case):
  sizes = GROUP_SIZES[case]
  x, w, sizes_E = _inputs(sizes)
  out = grouped_matmul(x, w, sizes_E, backend)
  assert out.shape == (sum(sizes), F) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, _numpy_gmm(x, w, sizes), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile", [1, 2, 4, 16])
def test_tiled_layout_any_tile(tile):
  sizes = GROUP_SIZES["uneven"]
  x, w, sizes_E = _inputs(sizes, seed=1)

  @jax.jit
  def run(x, w, sizes_E):
    layout = gmm.TiledLayout(sizes_E, x.shape[0], tile)
    return layout.unpad(layout.matmul(layout.pad(x), w))

  np.testing.assert_allclose(run(x, w, sizes_E), _numpy_gmm(x, w, sizes), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("backend", ["tiled", "chunked", "blocked", "megablox"])
@pytest.mark.parametrize("case", sorted(GROUP_SIZES))
def test_gradients_equal_ragged_dot(case, backend):
  x, w, sizes_E = _inputs(GROUP_SIZES[case], seed=2)
  ct = jnp.asarray(np.random.default_rng(3).normal(size=(x.shape[0], F)), jnp.float32)

  def grads(backend):
    loss = lambda x, w: jnp.sum(gmm.grouped_matmul(x, w, sizes_E, backend) * ct)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

  (gx_t, gw_t), (gx_r, gw_r) = grads(backend), grads("ragged_dot")
  np.testing.assert_allclose(gx_t, gx_r, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw_t, gw_r, rtol=1e-5, atol=1e-5)
  # An empty group's weight gets exactly zero gradient.
  for e, n in enumerate(GROUP_SIZES[case]):
    if n == 0:
      np.testing.assert_array_equal(gw_t[e], np.zeros((D, F), np.float32))


@pytest.mark.parametrize("e,m,tile", [(1, 13, 4), (3, 0, 8), (4, 13, 8), (5, 40, 1),
                                      (8, 21, 2), (8, 64, 16)])
def test_tiled_layout_bound_and_placement(e, m, tile):
  static = {}

  @jax.jit
  def run(sizes_E):
    layout = gmm.TiledLayout(sizes_E, m, tile)
    static["num_tiles"] = layout.num_tiles  # a Python int, fixed at trace time
    return layout.padded_pos_M, layout.tile_group_Z, layout.pad(jnp.ones((m, 2), jnp.float32))

  rng = np.random.default_rng(4)
  for trial in range(6):
    if trial == 0:
      sizes = np.zeros(e, np.int64)
      sizes[-1] = m  # everything in the last group
    else:
      sizes = np.bincount(rng.integers(0, e, size=m), minlength=e)
    pos_M, tile_group_Z, padded = run(jnp.asarray(sizes, jnp.int32))
    num_tiles = static["num_tiles"]
    used = int(sum(math.ceil(n / tile) for n in sizes))
    assert num_tiles == math.ceil(m / tile) + e
    assert used <= num_tiles, (sizes, tile)
    pos_M, tile_group_Z = np.asarray(pos_M), np.asarray(tile_group_Z)
    assert tile_group_Z.shape == (num_tiles,)
    assert len(set(pos_M.tolist())) == m  # no two rows share a slot
    assert np.all((pos_M >= 0) & (pos_M < num_tiles * tile))
    # Each row lands in a tile of its own group.
    np.testing.assert_array_equal(tile_group_Z[pos_M // tile], np.repeat(np.arange(e), sizes))
    assert np.all(tile_group_Z[used:] == 0)  # unused trailing tiles point at group 0
    assert float(np.asarray(padded).sum()) == 2 * m  # padding rows are zero


def test_default_tile():
  assert gmm.default_tile(16, 4) == 8
  assert gmm.default_tile(1 << 22, 8) == 256
  for m in (64, 1000, 4096, 65536):
    for e in (2, 8, 64):
      t = gmm.default_tile(m, e)
      assert t in (8, 16, 32, 64, 128, 256)
      assert t == 8 or e * t <= 0.0625 * m
      assert t == 256 or e * 2 * t > 0.0625 * m  # the largest that keeps the bound


def test_resolve_backend_and_unknown():
  assert gmm.resolve_backend("tiled") == "tiled"
  assert gmm.resolve_backend("ragged_dot") == "ragged_dot"
  expected = "chunked" if jax.default_backend() == "cpu" else "ragged_dot"
  assert gmm.resolve_backend("auto") == expected
  x, w, sizes_E = _inputs([2, 2])
  with pytest.raises(ValueError, match="unknown backend"):
    gmm.grouped_matmul(x, w, sizes_E, "dense")


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_chunked_any_chunk_matches_numpy(chunk):
  x, w, sizes_E = _inputs(GROUP_SIZES[sorted(GROUP_SIZES)[0]], seed=5)
  out = jax.jit(lambda x, w, s: gmm.chunked_gmm(x, w, s, chunk))(x, w, sizes_E)
  np.testing.assert_allclose(out, _numpy_gmm(x, w, np.asarray(sizes_E)), rtol=1e-5, atol=1e-5)


def test_chunked_executed_rows_bound():
  sizes = jnp.array([0, 5, 16, 17], jnp.int32)
  assert int(gmm.chunked_executed_rows(sizes, 8)) == 0 + 8 + 16 + 24


@pytest.mark.parametrize("backend", ["chunked", "blocked"])
def test_rows_in_no_group_leave_the_real_rows_and_gradients_exact(backend):
  # The dropless path sorts padding last, in no group: sizes add up to fewer than M rows.
  sizes = [3, 0, 5, 2]
  x, w, sizes_E = _inputs(sizes + [6], seed=4)  # 16 rows, the last 6 in no group
  w, sizes_E = w[:4], sizes_E[:4]
  real = sum(sizes)
  ct = jnp.asarray(np.random.default_rng(5).normal(size=(x.shape[0], F)), jnp.float32)
  ct = ct * (jnp.arange(x.shape[0]) < real)[:, None]  # padding's output is never used

  def grads(backend):
    loss = lambda x, w: jnp.sum(gmm.grouped_matmul(x, w, sizes_E, backend) * ct)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

  out = grouped_matmul(x, w, sizes_E, backend)
  np.testing.assert_allclose(out[:real], _numpy_gmm(x[:real], w, sizes), rtol=1e-5, atol=1e-5)
  if backend == "blocked":
    np.testing.assert_array_equal(out[real:], np.zeros((x.shape[0] - real, F), np.float32))
  (gx, gw), (gx_r, gw_r) = grads(backend), grads("ragged_dot")
  np.testing.assert_allclose(gx, gx_r, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, gw_r, rtol=1e-5, atol=1e-5)
