"""Routers: router logits -> which K experts each token goes to, and with what weight.

Shape letters: G groups (sequences), S tokens per group, D model width, E experts,
K experts per token. All router math is float32 whatever the compute dtype.

A router function takes logits [G, S, E] (float32) and returns a `Routing`. To add one,
write the function, add it to ROUTERS, and add its name to moex/config.py ROUTERS.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class Routing(NamedTuple):
  """A router's decision for every token."""

  expert_index_GxSxK: jax.Array  # int32, the k-th choice of each token (best first).
  combine_weight_GxSxK: jax.Array  # float32, weight of each choice in the output sum.
  probs_GxSxE: jax.Array  # float32, the router's distribution over all experts.
  logits_GxSxE: jax.Array  # float32, raw router logits (for the z-loss).


def topk_softmax(logits_GxSxE: jax.Array, top_k: int) -> Routing:
  """Mixtral: choose the top-k logits, softmax over those k only."""
  top_logits_GxSxK, index_GxSxK = jax.lax.top_k(logits_GxSxE, top_k)
  return Routing(
      expert_index_GxSxK=index_GxSxK.astype(jnp.int32),
      combine_weight_GxSxK=jax.nn.softmax(top_logits_GxSxK, axis=-1),
      probs_GxSxE=jax.nn.softmax(logits_GxSxE, axis=-1),
      logits_GxSxE=logits_GxSxE,
  )


ROUTERS: dict[str, Callable[..., Routing]] = {
    "topk_softmax": topk_softmax,
}


class Router(nnx.Module):
  """The gate: a float32 linear map from token to one logit per expert."""

  def __init__(self, d_model: int, num_experts: int, init_std: float, rngs: nnx.Rngs):
    init = nnx.initializers.normal(stddev=init_std)
    self.kernel_DxE = nnx.Param(init(rngs.params(), (d_model, num_experts), jnp.float32),
                                out_sharding=("embed", None))

  def __call__(self, x_GxSxD: jax.Array) -> jax.Array:
    return jnp.einsum("gsd,de->gse", x_GxSxD.astype(jnp.float32),
                      self.kernel_DxE[...].astype(jnp.float32))
