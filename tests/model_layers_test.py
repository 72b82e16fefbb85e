"""moex/model/layers.py: attention with q/k norm against a NumPy reference of the same math."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import tiny
from moex import config as config_lib
from moex.model import layers
# Imported as the trainer does: it turns off flax's eager sharding, which needs a mesh.
from moex.train import state as _  # pylint: disable=unused-import


def _model_cfg(qk_norm: str) -> config_lib.ModelConfig:
  cfg = config_lib.validate(tiny.get_config(), vocab_size=259).model
  return dataclasses.replace(cfg, qk_norm=qk_norm, num_heads=4, num_kv_heads=2, head_dim=16,
                             d_model=48)  # head_dim * heads != d_model: explicit head width


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x_LxHxA, theta):
  l, _, a = x_LxHxA.shape
  freq = theta ** (-np.arange(0, a, 2) / a)
  ang = np.arange(l)[:, None] * freq  # [L, A/2]
  cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
  x1, x2 = x_LxHxA[..., :a // 2], x_LxHxA[..., a // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _reference(attn, x_LxD, cfg):
  """One sequence, written out: projections, q/k norm, RoPE, causal GQA softmax attention."""
  p = lambda v: np.asarray(v[...], np.float64)
  q = np.einsum("ld,dha->lha", x_LxD, p(attn.q_DxHxA))
  k = np.einsum("ld,dja->lja", x_LxD, p(attn.k_DxJxA))
  v = np.einsum("ld,dja->lja", x_LxD, p(attn.v_DxJxA))
  l, h, a = q.shape
  j = k.shape[1]
  if cfg.qk_norm == "head":
    q = _rms(q, p(attn.q_norm.scale), cfg.norm_eps)
    k = _rms(k, p(attn.k_norm.scale), cfg.norm_eps)
  elif cfg.qk_norm == "full":
    q = _rms(q.reshape(l, h * a), p(attn.q_norm.scale), cfg.norm_eps).reshape(l, h, a)
    k = _rms(k.reshape(l, j * a), p(attn.k_norm.scale), cfg.norm_eps).reshape(l, j, a)
  q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
  k, v = np.repeat(k, h // j, axis=1), np.repeat(v, h // j, axis=1)
  s = np.einsum("qha,kha->hqk", q, k) / np.sqrt(a)
  s = np.where(np.tril(np.ones((l, l), bool)), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = np.einsum("hqk,kha->qha", w, v)
  return np.einsum("qha,had->qd", out, p(attn.o_HxAxD))


@pytest.mark.parametrize("qk_norm", ["none", "head", "full"])
def test_attention_matches_reference(qk_norm):
  cfg = _model_cfg(qk_norm)
  attn = layers.Attention(cfg, nnx.Rngs(0))
  if attn.q_norm is not None:  # non-trivial scales, different for q and k
    attn.q_norm.scale[...] = 1 + jax.random.normal(jax.random.PRNGKey(1),
                                                   attn.q_norm.scale.shape)
    attn.k_norm.scale[...] = 1 + jax.random.normal(jax.random.PRNGKey(2),
                                                   attn.k_norm.scale.shape)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (1, 40, cfg.d_model)))
  got = np.asarray(attn(x))[0]
  want = _reference(attn, x[0].astype(np.float64), cfg)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4)


def test_qk_norm_shapes():
  cfg = _model_cfg("full")
  attn = layers.Attention(cfg, nnx.Rngs(0))
  assert attn.q_norm.scale.shape == (4 * 16,) and attn.k_norm.scale.shape == (2 * 16,)
  head = layers.Attention(_model_cfg("head"), nnx.Rngs(0))
  assert head.q_norm.scale.shape == (16,) and head.k_norm.scale.shape == (16,)
  assert layers.Attention(_model_cfg("none"), nnx.Rngs(0)).q_norm is None
  # Each scale is named for its width, one meaning per letter (D stays the model width).
  assert (attn.q_norm.scale_name, attn.k_norm.scale_name) == ("scale_HA", "scale_JA")
  assert (head.q_norm.scale_name, head.k_norm.scale_name) == ("scale_A", "scale_A")
  assert layers.RMSNorm(8, _model_cfg("none"), nnx.Rngs(0)).scale_name == "scale_D"
  assert set(nnx.to_pure_dict(nnx.state(attn.q_norm, nnx.Param))) == {"scale_HA"}


def test_segment_mask_by_hand():
  """Causal within a document piece; padding (0) sees only earlier padding."""
  seg = np.array([[1, 1, 2, 2, 0]], np.int32)
  want = np.array([[1, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0],
                   [0, 0, 1, 0, 0],
                   [0, 0, 1, 1, 0],
                   [0, 0, 0, 0, 1]], bool)
  mask = np.asarray(layers.segment_mask(seg))
  assert mask.shape == (1, 1, 5, 5)
  np.testing.assert_array_equal(mask[0, 0], want)
