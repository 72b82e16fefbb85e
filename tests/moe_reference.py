"""A deliberately slow, plain reference of the MoE block, for the moe_*_test.py files.

Written token by token and choice by choice, with none of the buffers, sorts or grouped
matmuls of moex/moe, so a test that agrees with it checks the fast paths against the
definition. Pure jnp: jax.grad works through it (the routing decisions are discrete).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def route_token(x_D: jax.Array, w_router_DxE: jax.Array,
                top_k: int) -> tuple[jax.Array, jax.Array]:
  """Mixtral routing of one token: (expert ids [K] best first, weights [K])."""
  logits_E = jnp.dot(x_D.astype(jnp.float32), w_router_DxE.astype(jnp.float32))
  # Stable sort on the negated logits: ties go to the lower expert id.
  experts_K = jnp.argsort(-logits_E, stable=True)[:top_k]
  return experts_K, jax.nn.softmax(logits_E[experts_K])


def expert_ffn(x_D: jax.Array, wg_DxF: jax.Array, wu_DxF: jax.Array,
               wd_FxD: jax.Array) -> jax.Array:
  """One SwiGLU expert on one token."""
  return (jax.nn.silu(x_D @ wg_DxF) * (x_D @ wu_DxF)) @ wd_FxD


def kept_mask_numpy(experts_BxLxK: np.ndarray, num_experts: int, capacity: int) -> np.ndarray:
  """Which assignments survive: per sequence, choice 0 of every token before choice 1, ...

  Within a choice, earlier positions first; expert e keeps its first `capacity`.
  """
  b, l, k = experts_BxLxK.shape
  kept_BxLxK = np.zeros((b, l, k), bool)
  for bi in range(b):
    taken_E = [0] * num_experts  # assignments this sequence has sent to each expert so far
    for ki in range(k):
      for t in range(l):
        e = int(experts_BxLxK[bi, t, ki])
        kept_BxLxK[bi, t, ki] = taken_E[e] < capacity
        taken_E[e] += 1
  return kept_BxLxK


def kept_mask(experts_BxLxK: jax.Array, num_experts: int, capacity: int | None) -> jax.Array:
  """kept_mask_numpy as a jax op (a host callback), usable under jit and grad."""
  if capacity is None:
    return jnp.ones(experts_BxLxK.shape, bool)
  return jax.pure_callback(
      lambda ex: kept_mask_numpy(np.asarray(ex), num_experts, capacity),
      jax.ShapeDtypeStruct(experts_BxLxK.shape, jnp.bool_),
      jax.lax.stop_gradient(experts_BxLxK))


def reference_moe(x_BxLxD: jax.Array, w_router_DxE: jax.Array, wg_ExDxF: jax.Array,
                  wu_ExDxF: jax.Array, wd_ExFxD: jax.Array, top_k: int,
                  capacity: int | None = None) -> tuple[jax.Array, jax.Array]:
  """The MoE block, token by token: (output [B, L, D], kept [B, L, K] bool).

  capacity=None is dropless. A dropped assignment contributes zero and the survivors keep
  their weights (no renormalization).
  """
  b, l, d = x_BxLxD.shape
  e = w_router_DxE.shape[1]
  x_TxD = x_BxLxD.reshape(b * l, d)
  experts_TxK, weights_TxK = jax.vmap(lambda x: route_token(x, w_router_DxE, top_k))(x_TxD)
  kept_BxLxK = kept_mask(experts_TxK.reshape(b, l, top_k), e, capacity)
  kept_TxK = kept_BxLxK.reshape(b * l, top_k)

  def one_token(x_D, experts_K, weights_K, kept_K):
    y_D = jnp.zeros((d,), jnp.float32)
    for j in range(top_k):
      ex = experts_K[j]
      out_D = expert_ffn(x_D, wg_ExDxF[ex], wu_ExDxF[ex], wd_ExFxD[ex])
      y_D = y_D + jnp.where(kept_K[j], weights_K[j], 0.0) * out_D
    return y_D

  y_TxD = jax.vmap(one_token)(x_TxD, experts_TxK, weights_TxK, kept_TxK)
  return y_TxD.reshape(b, l, d).astype(x_BxLxD.dtype), kept_BxLxK
