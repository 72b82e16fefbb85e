"""The key/value cache for generation: static shapes, left-padded prompts.

Shape letters as in layers.py; here L is the cache length (columns), T the tokens of one
call (the prompt width at prefill, 1 at a decode step).

Every sequence of a batch shares the cache's columns. Prompts are left-padded to a common
width, so all of them end at the same column and each decode step writes one column for
the whole batch (`index`, a scalar). Sequence b's real tokens start at column `start_B[b]`;
its token in column c has position c - start_B[b] (rotary), and a query in column c sees
the keys in columns start_B[b] .. c. A padding column attends only to itself (so no row of
the softmax is empty) and no real token ever attends to it.

The cache holds J key/value heads per layer, not H (grouped-query attention), in the
compute dtype. The shapes (batch, length) fix one compilation of the prefill (per prompt
width) and one of the decode step; `index` and `start_B` are traced values.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from moex.config import ModelConfig
from moex.parallel import sharding

# Logical axes of a cached key or value [B, L, J, A] (moex/parallel/sharding.py rules).
KV_AXES = ("batch", None, "kv_heads", None)


class LayerKV(NamedTuple):
  """One attention layer's cached keys and values."""

  k_BxLxJxA: jax.Array
  v_BxLxJxA: jax.Array


class KVCache(NamedTuple):
  """Every layer's keys and values plus where each sequence starts."""

  layers: tuple[LayerKV, ...]  # one per decoder block
  start_B: jax.Array  # int32 [B]: the first real (non-padding) column of each sequence
  index: jax.Array  # int32 []: columns written so far, i.e. the next call's first column

  @property
  def length(self) -> int:
    return self.layers[0].k_BxLxJxA.shape[1]


class Window(NamedTuple):
  """Where one call's T tokens sit: computed once, shared by every layer."""

  index: jax.Array  # int32 []: the column of the first of the T tokens
  positions_BxT: jax.Array  # int32: rotary positions (0 for padding columns)
  mask_BxTxL: jax.Array  # bool: which cache columns each of the T queries attends to


def init(cfg: ModelConfig, start_B: jax.Array, length: int) -> KVCache:
  """An empty cache of `length` columns for len(start_B) sequences."""
  b = start_B.shape[0]
  shape = (b, length, cfg.num_kv_heads, cfg.head_dim)
  zeros = lambda: jnp.zeros(shape, jnp.dtype(cfg.dtype))
  layers = tuple(LayerKV(zeros(), zeros()) for _ in range(cfg.num_layers))
  return KVCache(layers, start_B.astype(jnp.int32), jnp.zeros((), jnp.int32))


def shardings(cfg: ModelConfig, mesh: Mesh, rules) -> KVCache:
  """NamedShardings of a cache (batch over the batch axes, heads over the kv_heads axes)."""
  kv = NamedSharding(mesh, sharding.logical_to_spec(KV_AXES, rules, mesh))
  batch = NamedSharding(mesh, sharding.logical_to_spec(("batch",), rules, mesh))
  layers = tuple(LayerKV(kv, kv) for _ in range(cfg.num_layers))
  return KVCache(layers, batch, sharding.replicated(mesh))


def window(cache: KVCache, num_tokens: int) -> Window:
  """Positions and attention mask of `num_tokens` new tokens written at cache.index."""
  col_T = cache.index + jnp.arange(num_tokens, dtype=jnp.int32)
  col_L = jnp.arange(cache.length, dtype=jnp.int32)
  start_Bx1 = cache.start_B[:, None]
  positions_BxT = jnp.maximum(col_T[None, :] - start_Bx1, 0)
  real_BxL = col_L[None, :] >= start_Bx1
  mask_BxTxL = ((real_BxL[:, None, :] & (col_L[None, None, :] <= col_T[None, :, None]))
                | (col_L[None, None, :] == col_T[None, :, None]))
  return Window(cache.index, positions_BxT, mask_BxTxL)


def write(kv: LayerKV, k_BxTxJxA: jax.Array, v_BxTxJxA: jax.Array, index: jax.Array
          ) -> LayerKV:
  """The layer's cache with T new columns written from column `index`."""
  at = (0, index, 0, 0)
  return LayerKV(jax.lax.dynamic_update_slice(kv.k_BxLxJxA, k_BxTxJxA.astype(
      kv.k_BxLxJxA.dtype), at), jax.lax.dynamic_update_slice(
          kv.v_BxLxJxA, v_BxTxJxA.astype(kv.v_BxLxJxA.dtype), at))


def nbytes(cache: KVCache, columns: int | None = None) -> int:
  """Bytes of keys and values in the first `columns` columns (default: all)."""
  kv = cache.layers[0].k_BxLxJxA
  b, length, j, a = kv.shape
  cols = length if columns is None else columns
  return 2 * len(cache.layers) * b * cols * j * a * kv.dtype.itemsize
