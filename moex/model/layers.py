"""Decoder building blocks: embedding, RMSNorm, rotary attention with GQA (and its cached
form for generation, moex/model/cache.py), SwiGLU.

Shape letters: B batch, L length, D model width, V vocabulary, H query heads,
J key/value heads, A head width, F feed-forward hidden width, W a norm's width (any of D, A,
H*A, J*A); letters side by side (HA) are one axis of their product.
Parameters carry logical axis names (`out_sharding`); moex/parallel/sharding.py maps
them to mesh axes with the config's rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moex.config import ModelConfig
from moex.model import cache as kv_cache
from moex.model import lora as lora_lib


def normal(std: float):
  return nnx.initializers.normal(stddev=std)


def param(rngs: nnx.Rngs, init, shape, dtype, names) -> nnx.Param:
  """A parameter initialised by `init` with logical axis `names`."""
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names)


class Embed(nnx.Module):
  """Token embedding table [V, D]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.table_VxD = param(rngs, normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                           jnp.dtype(cfg.param_dtype), ("vocab", "embed"))
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    return jnp.take(self.table_VxD[...], tokens_BxL, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm over the last axis with a learned scale, computed in float32.

  The scale is named for the width it normalizes, one meaning per letter: scale_D (model
  width), scale_A (one head: q/k norm "head"), scale_HA and scale_JA (all query or key heads
  flattened: q/k norm "full").
  """

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs, width: str = "D"):
    del rngs
    self.scale_name = f"scale_{width}"
    setattr(self, self.scale_name, nnx.Param(jnp.ones((dim,), jnp.dtype(cfg.param_dtype)),
                                             out_sharding=("norm",)))
    self.eps = cfg.norm_eps

  @property
  def scale(self) -> nnx.Param:
    return getattr(self, self.scale_name)

  def __call__(self, x_BxLxW: jax.Array) -> jax.Array:
    """x [..., W], W the scale's width (D, A, H*A or J*A)."""
    x = x_BxLxW.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(x_BxLxW.dtype)


def segment_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """Causal attention within each document piece: [B, 1, L, L] bool, query i sees key j iff
  j <= i and seg[i] == seg[j]. Real tokens (seg != 0) never see another piece or padding;
  a padding token sees the padding before it (so no softmax row is empty; its output is
  never used)."""
  l = segment_ids_BxL.shape[-1]
  causal_LxL = jnp.tril(jnp.ones((l, l), bool))
  same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return (same_BxLxL & causal_LxL)[:, None]


def rotary(x_BxLxHxA: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Applies rotary position embeddings (the split-halves form of GPT-NeoX / Llama)."""
  a = x_BxLxHxA.shape[-1]
  freq = theta ** (-jnp.arange(0, a, 2, dtype=jnp.float32) / a)
  angle_BxLxA2 = positions_BxL[..., None].astype(jnp.float32) * freq
  sin, cos = jnp.sin(angle_BxLxA2)[:, :, None, :], jnp.cos(angle_BxLxA2)[:, :, None, :]
  x1, x2 = jnp.split(x_BxLxHxA.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxA.dtype)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with rotary embeddings."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs,
               adapters: lora_lib.Factory | None = None):
    d, h, j, a = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    self.q_DxHxA = param(rngs, normal(cfg.init_std), (d, h, a), pd, ("embed", "heads", None))
    self.k_DxJxA = param(rngs, normal(cfg.init_std), (d, j, a), pd, ("embed", "kv_heads", None))
    self.v_DxJxA = param(rngs, normal(cfg.init_std), (d, j, a), pd, ("embed", "kv_heads", None))
    self.o_HxAxD = param(rngs, normal(out_std), (h, a, d), pd, ("heads", None, "embed"))
    self.theta = cfg.rope_theta
    # q/k RMSNorm before RoPE (model.qk_norm): per head over A, or over the whole projection.
    self.qk_norm = cfg.qk_norm
    norms = {"head": ((a, "A"), (a, "A")), "full": ((h * a, "HA"), (j * a, "JA"))}.get(cfg.qk_norm)
    self.q_norm = None if norms is None else RMSNorm(norms[0][0], cfg, rngs, width=norms[0][1])
    self.k_norm = None if norms is None else RMSNorm(norms[1][0], cfg, rngs, width=norms[1][1])
    # Adapters (lora.targets q, k, v, o; None when left out): moex/model/lora.py.
    adapters = adapters or lora_lib.Factory(None, rngs)
    self.lora_q = adapters("q", "q_DxHxA", (d, h, a), ("embed", "heads", None), 1)
    self.lora_k = adapters("k", "k_DxJxA", (d, j, a), ("embed", "kv_heads", None), 1)
    self.lora_v = adapters("v", "v_DxJxA", (d, j, a), ("embed", "kv_heads", None), 1)
    self.lora_o = adapters("o", "o_HxAxD", (h, a, d), ("heads", None, "embed"), 2)

  def _norm(self, norm: "RMSNorm | None", x_BxLxHxA: jax.Array) -> jax.Array:
    if norm is None:
      return x_BxLxHxA
    if self.qk_norm == "head":
      return norm(x_BxLxHxA)
    b, l, h, a = x_BxLxHxA.shape
    return norm(x_BxLxHxA.reshape(b, l, h * a)).reshape(b, l, h, a)

  def _qkv(self, x_BxLxD: jax.Array, pos_BxL: jax.Array):
    """Queries [B, L, H, A], keys and values [B, L, J, A] at positions pos_BxL."""
    dt = x_BxLxD.dtype
    q = _plus(jnp.einsum("bld,dha->blha", x_BxLxD, self.q_DxHxA[...].astype(dt)),
              self.lora_q, x_BxLxD)
    k = _plus(jnp.einsum("bld,dja->blja", x_BxLxD, self.k_DxJxA[...].astype(dt)),
              self.lora_k, x_BxLxD)
    v = _plus(jnp.einsum("bld,dja->blja", x_BxLxD, self.v_DxJxA[...].astype(dt)),
              self.lora_v, x_BxLxD)
    q, k = self._norm(self.q_norm, q), self._norm(self.k_norm, k)
    return rotary(q, pos_BxL, self.theta), rotary(k, pos_BxL, self.theta), v

  def _out(self, out_BxLxHxA: jax.Array) -> jax.Array:
    dt = out_BxLxHxA.dtype
    return _plus(jnp.einsum("blha,had->bld", out_BxLxHxA, self.o_HxAxD[...].astype(dt)),
                 self.lora_o, out_BxLxHxA)

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array | None = None,
               mask_Bx1xLxL: jax.Array | None = None) -> jax.Array:
    """Training and full-sequence evaluation: RoPE at `positions_BxL` (None: 0..L-1);
    attention causal, or as `mask_Bx1xLxL` allows (document_mask: causal within a document
    piece, built once per forward pass by the decoder)."""
    b, l, _ = x_BxLxD.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l), (b, l))
    q, k, v = self._qkv(x_BxLxD, positions_BxL)
    if mask_Bx1xLxL is None:
      return self._out(jax.nn.dot_product_attention(q, k, v, is_causal=True))
    return self._out(jax.nn.dot_product_attention(q, k, v, mask=mask_Bx1xLxL))

  def cached(self, x_BxTxD: jax.Array, kv: kv_cache.LayerKV, at: kv_cache.Window
             ) -> tuple[jax.Array, kv_cache.LayerKV]:
    """Generation: T new tokens written into the layer's cache at `at.index`, attending to
    the cache columns `at.mask_BxTxL` allows; returns (output [B, T, D], updated cache)."""
    q, k, v = self._qkv(x_BxTxD, at.positions_BxT)
    kv = kv_cache.write(kv, k, v, at.index)
    out_BxTxHxA = jax.nn.dot_product_attention(q, kv.k_BxLxJxA, kv.v_BxLxJxA,
                                               mask=at.mask_BxTxL[:, None])
    return self._out(out_BxTxHxA), kv


def _plus(y: jax.Array, adapter: "lora_lib.Adapter | None", x: jax.Array) -> jax.Array:
  """y + the adapter's scale * (x A) B (y itself without one)."""
  return y if adapter is None else y + adapter(x)


class SwiGLU(nnx.Module):
  """Dense SwiGLU feed-forward block: (silu(x Wg) * x Wu) Wd. `lora_target` ("dense" or
  "shared") names its adapters' target in lora.targets."""

  def __init__(self, d_model: int, d_ff: int, cfg: ModelConfig, rngs: nnx.Rngs,
               adapters: lora_lib.Factory | None = None, lora_target: str = "dense"):
    pd = jnp.dtype(cfg.param_dtype)
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    self.gate_DxF = param(rngs, normal(cfg.init_std), (d_model, d_ff), pd, ("embed", "mlp"))
    self.up_DxF = param(rngs, normal(cfg.init_std), (d_model, d_ff), pd, ("embed", "mlp"))
    self.down_FxD = param(rngs, normal(out_std), (d_ff, d_model), pd, ("mlp", "embed"))
    adapters = adapters or lora_lib.Factory(None, rngs)
    adapter = lambda name, shape, names: adapters(lora_target, name, shape, names, 1)
    self.lora_gate = adapter("gate_DxF", (d_model, d_ff), ("embed", "mlp"))
    self.lora_up = adapter("up_DxF", (d_model, d_ff), ("embed", "mlp"))
    self.lora_down = adapter("down_FxD", (d_ff, d_model), ("mlp", "embed"))

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dt = x_BxLxD.dtype
    g = _plus(x_BxLxD @ self.gate_DxF[...].astype(dt), self.lora_gate, x_BxLxD)
    u = _plus(x_BxLxD @ self.up_DxF[...].astype(dt), self.lora_up, x_BxLxD)
    h = jax.nn.silu(g) * u
    return _plus(h @ self.down_FxD[...].astype(dt), self.lora_down, h)
