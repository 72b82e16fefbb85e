"""The routed experts: E SwiGLU feed-forward blocks with weights [E, D, F] and [E, F, D]."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moex.moe import gmm


class Experts(nnx.Module):
  """E independent SwiGLU experts, applied to buffers or to rows grouped by expert."""

  def __init__(self, num_experts: int, d_model: int, d_expert: int, init_std: float,
               out_std: float, param_dtype, rngs: nnx.Rngs):
    e, d, f = num_experts, d_model, d_expert
    init, out_init = nnx.initializers.normal(init_std), nnx.initializers.normal(out_std)
    names_in, names_out = ("expert", "embed", "expert_mlp"), ("expert", "expert_mlp", "embed")
    self.gate_ExDxF = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                                out_sharding=names_in)
    self.up_ExDxF = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                              out_sharding=names_in)
    self.down_ExFxD = nnx.Param(out_init(rngs.params(), (e, f, d), param_dtype),
                                out_sharding=names_out)

  def weights(self, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (self.gate_ExDxF[...].astype(dtype), self.up_ExDxF[...].astype(dtype),
            self.down_ExFxD[...].astype(dtype))

  def buffered(self, x_ExRxD: jax.Array) -> jax.Array:
    """Expert e applied to its R buffer rows: [E, R, D]."""
    wg, wu, wd = self.weights(x_ExRxD.dtype)
    g = jnp.einsum("erd,edf->erf", x_ExRxD, wg)
    u = jnp.einsum("erd,edf->erf", x_ExRxD, wu)
    return jnp.einsum("erf,efd->erd", jax.nn.silu(g) * u, wd)

  def grouped(self, x_MxD: jax.Array, group_sizes_E: jax.Array, backend: str) -> jax.Array:
    """Rows sorted by expert, group_sizes_E rows each: [M, D]."""
    wg, wu, wd = self.weights(x_MxD.dtype)
    backend = gmm.resolve_backend(backend)
    if backend == "tiled":  # Pad once; all three matmuls run in the tiled layout.
      layout = gmm.TiledLayout(group_sizes_E, x_MxD.shape[0],
                               gmm.default_tile(x_MxD.shape[0], wg.shape[0]))
      x_NxTxD = layout.pad(x_MxD)
      h = jax.nn.silu(layout.matmul(x_NxTxD, wg)) * layout.matmul(x_NxTxD, wu)
      return layout.unpad(layout.matmul(h, wd))
    g = gmm.grouped_matmul(x_MxD, wg, group_sizes_E, backend)
    u = gmm.grouped_matmul(x_MxD, wu, group_sizes_E, backend)
    return gmm.grouped_matmul(jax.nn.silu(g) * u, wd, group_sizes_E, backend)
