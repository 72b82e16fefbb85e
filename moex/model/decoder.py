"""The Mixtral-style decoder: embed -> blocks (attention, then dense or MoE FFN) -> logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moex.config import LoRAConfig, ModelConfig, MoEConfig
from moex.model import lora as lora_lib
from moex.model import cache as kv_cache
from moex.model.layers import Attention, Embed, RMSNorm, SwiGLU, normal, param, segment_mask
from moex.moe.layer import MoEBlock, MoEOutput


class Block(nnx.Module):
  """Pre-norm residual block; the feed-forward part is dense SwiGLU or MoE."""

  def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, is_moe: bool, rngs: nnx.Rngs,
               adapters: lora_lib.Factory | None = None):
    self.attn_norm = RMSNorm(cfg.d_model, cfg, rngs)
    self.attn = Attention(cfg, rngs, adapters)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg, rngs)
    self.is_moe = is_moe
    if is_moe:
      self.ffn = MoEBlock(cfg, moe_cfg, rngs, adapters)
    else:
      self.ffn = SwiGLU(cfg.d_model, cfg.d_ff, cfg, rngs, adapters, "dense")

  def __call__(self, x_BxLxD: jax.Array, *, train: bool, tokens_BxL: jax.Array,
               rng: jax.Array | None, positions_BxL: jax.Array | None = None,
               mask_Bx1xLxL: jax.Array | None = None, valid_BxL: jax.Array | None = None
               ) -> tuple[jax.Array, MoEOutput | None]:
    """`positions_BxL` (RoPE) and `mask_Bx1xLxL` (attention) as in Attention; `valid_BxL`
    marks real tokens for the MoE layer (None: all are)."""
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL, mask_Bx1xLxL)
    h_BxLxD = self.ffn_norm(x_BxLxD)
    if self.is_moe:
      y_BxLxD, moe = self.ffn(h_BxLxD, train=train, tokens_BxL=tokens_BxL, rng=rng,
                              valid_BxL=valid_BxL)
    else:
      y_BxLxD, moe = self.ffn(h_BxLxD), None
    return x_BxLxD + y_BxLxD, moe

  def cached(self, x_BxTxD: jax.Array, kv: kv_cache.LayerKV, at: kv_cache.Window, *,
             tokens_BxT: jax.Array) -> tuple[jax.Array, kv_cache.LayerKV, MoEOutput | None]:
    """Generation (evaluation mode): attention through the layer's cache."""
    attn_BxTxD, kv = self.attn.cached(self.attn_norm(x_BxTxD), kv, at)
    x_BxTxD = x_BxTxD + attn_BxTxD
    h_BxTxD = self.ffn_norm(x_BxTxD)
    if self.is_moe:
      y_BxTxD, moe = self.ffn(h_BxTxD, train=False, tokens_BxL=tokens_BxT)
    else:
      y_BxTxD, moe = self.ffn(h_BxTxD), None
    return x_BxTxD + y_BxTxD, kv, moe


class Decoder(nnx.Module):
  """Decoder-only transformer; returns float32 logits [B, L, V] and the MoE blocks'
  MoEOutput stacked over MoE layers (leading axis N; None for a dense model). `lora` adds
  the adapters its targets name (moex/model/lora.py; None or rank 0: none)."""

  def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, rngs: nnx.Rngs,
               lora: LoRAConfig | None = None):
    self.embed = Embed(cfg, rngs)
    # Named attributes (not a list) keep checkpoint keys readable: block_0, block_1, ...
    self.num_layers = cfg.num_layers
    self.remat = cfg.remat
    adapters = lora_lib.Factory(lora, rngs)
    for i in range(cfg.num_layers):
      setattr(self, f"block_{i}", Block(cfg, moe_cfg, cfg.is_moe_layer(i), rngs, adapters))
    self.final_norm = RMSNorm(cfg.d_model, cfg, rngs)
    self.unembed_DxV = param(rngs, normal(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                             jnp.dtype(cfg.param_dtype), ("embed", "vocab"))

  def __call__(self, tokens_BxL: jax.Array, *, train: bool, rng: jax.Array | None = None,
               segment_ids_BxL: jax.Array | None = None,
               positions_BxL: jax.Array | None = None,
               document_mask: bool = True) -> tuple[jax.Array, MoEOutput | None]:
    """`rng` drives router noise in training; None at eval (routing is then deterministic).

    Packed rows (WORKSPACE.md "Document masks"): `segment_ids_BxL` (0 = padding, k >= 1 the
    k-th document piece) makes padding invisible to the MoE layers (no capacity slot, no
    statistic, no balancing term) and, with `document_mask`, restricts attention to the
    query's own piece; `positions_BxL` are the RoPE positions (None: 0..L-1). Without
    segment ids the row is one causal stream.
    """
    x_BxLxD = self.embed(tokens_BxL)
    moe_outputs = []
    valid_BxL = mask_Bx1xLxL = None
    if segment_ids_BxL is not None:  # built once here, shared by every block
      valid_BxL = segment_ids_BxL != 0
      if document_mask:
        mask_Bx1xLxL = segment_mask(segment_ids_BxL)

    def run_block(block, x_BxLxD, layer_rng):
      return block(x_BxLxD, train=train, tokens_BxL=tokens_BxL, rng=layer_rng,
                   positions_BxL=positions_BxL, mask_Bx1xLxL=mask_Bx1xLxL,
                   valid_BxL=valid_BxL)

    if self.remat != "none":  # recompute each block's activations in the backward pass
      policy = (None if self.remat == "full"
                else getattr(jax.checkpoint_policies, self.remat))
      run_block = nnx.remat(run_block, policy=policy)
    for i in range(self.num_layers):
      layer_rng = None if rng is None else jax.random.fold_in(rng, i)
      x_BxLxD, moe = run_block(getattr(self, f"block_{i}"), x_BxLxD, layer_rng)
      if moe is not None:
        moe_outputs.append(moe)
    return self._logits(x_BxLxD), _stack(moe_outputs)

  def _logits(self, x_BxLxD: jax.Array) -> jax.Array:
    x_BxLxD = self.final_norm(x_BxLxD)
    logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD,
                              self.unembed_DxV[...].astype(x_BxLxD.dtype))
    return logits_BxLxV.astype(jnp.float32)

  def cached(self, tokens_BxT: jax.Array, cache: kv_cache.KVCache, *, last_only: bool = False
             ) -> tuple[jax.Array, kv_cache.KVCache, MoEOutput | None]:
    """Generation: T tokens per sequence written into the cache from column cache.index
    (a prefill of left-padded prompts, or one decode step with T = 1), in evaluation mode
    (MoE dropless unless moe.eval_capacity_factor > 0).

    Returns (float32 logits [B, T, V], or [B, 1, V] of the last column when `last_only`;
    the updated cache; the MoE blocks' MoEOutput stacked over MoE layers, or None).
    """
    at = kv_cache.window(cache, tokens_BxT.shape[1])
    x_BxTxD = self.embed(tokens_BxT)
    layers, moe_outputs = [], []
    for i in range(self.num_layers):
      x_BxTxD, kv, moe = getattr(self, f"block_{i}").cached(
          x_BxTxD, cache.layers[i], at, tokens_BxT=tokens_BxT)
      layers.append(kv)
      if moe is not None:
        moe_outputs.append(moe)
    if last_only:
      x_BxTxD = x_BxTxD[:, -1:]
    new_cache = kv_cache.KVCache(tuple(layers), cache.start_B,
                                 cache.index + tokens_BxT.shape[1])
    return self._logits(x_BxTxD), new_cache, _stack(moe_outputs)


def _stack(moe_outputs: list) -> MoEOutput | None:
  """Per-layer MoEOutputs stacked on a leading axis N (None for a dense model)."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *moe_outputs) if moe_outputs else None
