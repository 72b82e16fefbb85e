"""The routed experts: E SwiGLU feed-forward blocks with weights [E, D, F] and [E, F, D].

The module only holds the parameters; the math is in pure functions of an `ExpertWeights`
so the expert-parallel wrapper can call them on its local shard inside shard_map.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moex.model import lora as lora_lib
from moex.moe import gmm


class ExpertAdapters(NamedTuple):
  """LoRA on the routed experts (moex/model/lora.py), per expert; each B already times the
  adapters' scale. The lowercase r is the rank."""

  gate_a_ExDxr: jax.Array
  gate_b_ExrxF: jax.Array
  up_a_ExDxr: jax.Array
  up_b_ExrxF: jax.Array
  down_a_ExFxr: jax.Array
  down_b_ExrxD: jax.Array


class ExpertWeights(NamedTuple):
  """The routed experts' weights (all E, or this device's E_local inside shard_map), and
  their adapters (None without)."""

  gate_ExDxF: jax.Array
  up_ExDxF: jax.Array
  down_ExFxD: jax.Array
  adapters: ExpertAdapters | None = None

  def astype(self, dtype) -> "ExpertWeights":
    cast = lambda ws: [w.astype(dtype) for w in ws]
    return ExpertWeights(*cast(self[:3]), None if self.adapters is None
                         else ExpertAdapters(*cast(self.adapters)))

  def projections(self):
    """(weight, adapter A, adapter B) of gate, up and down (A, B None without adapters)."""
    ad = self.adapters
    if ad is None:
      return tuple((w, None, None) for w in self[:3])
    return ((self.gate_ExDxF, ad.gate_a_ExDxr, ad.gate_b_ExrxF),
            (self.up_ExDxF, ad.up_a_ExDxr, ad.up_b_ExrxF),
            (self.down_ExFxD, ad.down_a_ExFxr, ad.down_b_ExrxD))


# Logical axis names of each weight, in ExpertWeights order: the parameters' shardings
# (moex/parallel/sharding.py) and the MoE shard_map's specs (moex/moe/parallel.py) use these.
# An adapter is split like its expert: A's input side like the weight's, B's output side.
LOGICAL_AXES = ExpertWeights(("expert", "embed", "expert_mlp"), ("expert", "embed", "expert_mlp"),
                             ("expert", "expert_mlp", "embed"))
ADAPTER_AXES = ExpertAdapters(("expert", "embed", None), ("expert", None, "expert_mlp"),
                              ("expert", "embed", None), ("expert", None, "expert_mlp"),
                              ("expert", "expert_mlp", None), ("expert", None, "embed"))


def _swiglu(mm, x, w: ExpertWeights):
  """silu(x Wg) * (x Wu), times Wd, with `mm(x, w)` a layout's per-expert matmul; each
  projection adds its adapter's (x A) B through the same mm (so through the same rows,
  tiles or blocks as the weight). x and the results may be pytrees of arrays (a layout
  that keeps rows in two places)."""

  def proj(x, weights):
    w_, a, b = weights
    y = mm(x, w_)
    return y if a is None else jax.tree.map(jnp.add, y, mm(mm(x, a), b))

  gate, up, down = w.projections()
  h = jax.tree.map(lambda g, u: jax.nn.silu(g) * u, proj(x, gate), proj(x, up))
  return proj(h, down)


def buffered(w: ExpertWeights, x_ExRxD: jax.Array) -> jax.Array:
  """Expert e applied to its R buffer rows: [E, R, D]."""
  w = w.astype(x_ExRxD.dtype)
  return _swiglu(lambda x, m: jnp.einsum("erd,edf->erf", x, m), x_ExRxD, w)


def grouped(w: ExpertWeights, x_MxD: jax.Array, group_sizes_E: jax.Array,
            backend: str) -> jax.Array:
  """Rows sorted by expert, group_sizes_E rows each: [M, D]."""
  w = w.astype(x_MxD.dtype)
  backend = gmm.resolve_backend(backend)
  if backend == "tiled":  # Pad once; every matmul runs in the tiled layout.
    layout = gmm.TiledLayout(group_sizes_E, x_MxD.shape[0],
                             gmm.default_tile(x_MxD.shape[0], w.gate_ExDxF.shape[0]))
    return layout.unpad(_swiglu(layout.matmul, layout.pad(x_MxD), w))
  if backend == "blocked":  # Blocks built once; the rows stay in both layouts throughout:
    # (blocks [E, C, .], the overflow rows [M, .]).
    layout = gmm.BlockedLayout(group_sizes_E, x_MxD.shape[0])
    mm = lambda x, m: (jnp.einsum("ecd,edf->ecf", x[0], m), layout.overflow(x[1], m))
    y_ExCxD, y_MxD = _swiglu(mm, (layout.to_blocks(x_MxD), x_MxD), w)
    return layout.from_blocks(y_ExCxD) + y_MxD
  return _swiglu(lambda x, m: gmm.grouped_matmul(x, m, group_sizes_E, backend), x_MxD, w)


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
  return _swiglu(lambda x, m: _gathered_matvec(x, m, expert_M), x_MxD, w)


class Experts(nnx.Module):
  """E independent SwiGLU experts' parameters."""

  def __init__(self, num_experts: int, d_model: int, d_expert: int, init_std: float,
               out_std: float, param_dtype, rngs: nnx.Rngs,
               adapters: lora_lib.Factory | None = None):
    e, d, f = num_experts, d_model, d_expert
    init, out_init = nnx.initializers.normal(init_std), nnx.initializers.normal(out_std)
    names = LOGICAL_AXES
    self.gate_ExDxF = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                                out_sharding=names.gate_ExDxF)
    self.up_ExDxF = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                              out_sharding=names.up_ExDxF)
    self.down_ExFxD = nnx.Param(out_init(rngs.params(), (e, f, d), param_dtype),
                                out_sharding=names.down_ExFxD)
    adapters = adapters or lora_lib.Factory(None, rngs)
    self.lora_gate = adapters("experts", "gate_ExDxF", (e, d, f), names.gate_ExDxF, 1, 1)
    self.lora_up = adapters("experts", "up_ExDxF", (e, d, f), names.up_ExDxF, 1, 1)
    self.lora_down = adapters("experts", "down_ExFxD", (e, f, d), names.down_ExFxD, 1, 1)

  def weights(self) -> ExpertWeights:
    ad = None
    if self.lora_gate is not None:
      ad = ExpertAdapters(*(x for m in (self.lora_gate, self.lora_up, self.lora_down)
                            for x in (m.a, m.scaled_b())))
    return ExpertWeights(self.gate_ExDxF[...], self.up_ExDxF[...], self.down_ExFxD[...], ad)

  # Convenience for single-device use (tests, benchmarks).
  def buffered(self, x_ExRxD: jax.Array) -> jax.Array:
    return buffered(self.weights(), x_ExRxD)

  def grouped(self, x_MxD: jax.Array, group_sizes_E: jax.Array, backend: str) -> jax.Array:
    return grouped(self.weights(), x_MxD, group_sizes_E, backend)
