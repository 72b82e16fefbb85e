"""moex/model/cache.py: prefill + decode steps through the KV cache give the full forward's
logits, for prompts of different lengths sharing a batch (left padding), MoE and dense
feed-forward blocks, grouped-query attention, every token-choice router.

Each case: a batch of prompts of lengths 3, 9 and 5 is prefilled; then each sequence is fed
its own next tokens (teacher forcing) one decode step at a time. Every position's logits,
prompt positions included, are compared with one full forward pass over that sequence
alone (no padding), float32, relative to the logits' largest magnitude.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from moe_reference import JIT_OPTIONS

from experiments import tiny
from moex import config as config_lib
from moex.model import cache as kv_cache
from moex.model.decoder import Decoder

nnx.use_eager_sharding(False)

LENGTHS = (3, 9, 5)
TOTAL = 14  # tokens per sequence fed in all (prompt + decode steps)
VOCAB = 64


def _cfg(**moe):
  cd = tiny.get_config()
  cd.model.update(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, d_ff=48, init_std=0.3)
  cd.moe.update(num_experts=8, top_k=2, d_expert=16, allow_noncausal_routing=False)
  for k, v in moe.items():
    section = cd.model if k in cd.model else cd.moe
    section[k] = v
  return config_lib.validate(cd)


def _sequences(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, VOCAB, TOTAL).astype(np.int32) for _ in LENGTHS]


def _apply_cached(graphdef, state, tokens, cache):
  return nnx.merge(graphdef, state).cached(tokens, cache)[:2]


def _apply_full(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens, train=False)[0]


# Module-level jits with fast-compile options: these tests' time is almost all compiling.
_cached = jax.jit(_apply_cached, static_argnums=0, **JIT_OPTIONS)
_full = jax.jit(_apply_full, static_argnums=0, **JIT_OPTIONS)


def cached_logits(net: Decoder, cfg, seqs, cache_len=24):
  """Logits of every position of each sequence from one prefill of the left-padded prompts
  and TOTAL - max(LENGTHS) decode steps: list of [positions, V]."""
  graphdef, state = nnx.split(net)
  width, b = max(LENGTHS), len(LENGTHS)
  prompt_BxP = np.zeros((b, width), np.int32)
  start_B = np.array([width - n for n in LENGTHS], np.int32)
  for i, n in enumerate(LENGTHS):
    prompt_BxP[i, width - n:] = seqs[i][:n]
  cache = kv_cache.init(cfg.model, jnp.asarray(start_B), cache_len)
  assert cache.layers[0].k_BxLxJxA.shape == (b, cache_len, cfg.model.num_kv_heads,
                                             cfg.model.head_dim)
  logits_BxPxV, cache = _cached(graphdef, state, jnp.asarray(prompt_BxP), cache)
  out = [list(np.asarray(logits_BxPxV[i, width - n:])) for i, n in enumerate(LENGTHS)]
  for t in range(TOTAL - width):
    tok_Bx1 = np.array([[seqs[i][n + t]] for i, n in enumerate(LENGTHS)], np.int32)
    logits_Bx1xV, cache = _cached(graphdef, state, jnp.asarray(tok_Bx1), cache)
    for i in range(b):
      out[i].append(np.asarray(logits_Bx1xV[i, 0]))
  assert int(cache.index) == TOTAL
  return [np.stack(o) for o in out]


def full_logits(net: Decoder, seqs):
  """The training-path forward (positions 0..L-1, causal) over each sequence's tokens, all
  in one batch padded on the right: causal attention and per-token dropless experts keep
  the padding out of every real position."""
  steps = TOTAL - max(LENGTHS)
  tokens_BxL = np.stack(seqs)[:, :max(LENGTHS) + steps]
  logits_BxLxV = np.asarray(_full(*nnx.split(net), jnp.asarray(tokens_BxL)))
  return [logits_BxLxV[i, :n + steps] for i, n in enumerate(LENGTHS)]


def relative_error(got, want) -> float:
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


CASES = {
    "moe_gather": dict(),  # decode: T*K = 6 < E = 8 -> the gather path
    "moe_dropless": dict(num_experts=4),  # decode: 6 >= 4 -> the grouped matmul
    "dense": dict(first_dense_layers=2),
    "moe_qk_norm_mqa": dict(qk_norm="head", num_kv_heads=1, dense_layers=(1,)),
    "moe_eval_capacity": dict(eval_capacity_factor=8.0),  # capacity path, nothing dropped
}


SLOW_CASES = ("dense", "moe_dropless")  # ~9 s each on 2 cores: the full suite only


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in sorted(CASES)])
def test_cached_decoding_equals_full_forward(case):
  cfg = _cfg(**CASES[case])
  net = Decoder(cfg.model, cfg.moe, nnx.Rngs(0))
  seqs = _sequences()
  want = full_logits(net, seqs)
  got = cached_logits(net, cfg, seqs)
  for i in range(len(LENGTHS)):
    assert got[i].shape == want[i].shape
    assert np.std(want[i]) > 0.3  # logits far from uniform: the comparison can fail
    assert relative_error(got[i], want[i]) <= 1e-5, (case, i)


ROUTERS = {"topk_softmax": {}, "softmax_topk": dict(renormalize=True),
           "switch": dict(top_k=1), "sigmoid_bias": {}, "hash": {}, "random": {}}


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_token_choice_router_decodes_like_the_full_forward(router):
  cfg = _cfg(router=router, num_layers=1, **ROUTERS[router])
  net = Decoder(cfg.model, cfg.moe, nnx.Rngs(1))
  if router == "sigmoid_bias":  # a non-zero balancing bias changes the choices
    net.block_0.ffn.router.bias_E[...] = jnp.linspace(-0.3, 0.3, cfg.moe.num_experts)
  seqs = _sequences(seed=2)
  for got, want in zip(cached_logits(net, cfg, seqs), full_logits(net, seqs)):
    assert relative_error(got, want) <= 1e-5, router


def test_padding_tokens_change_nothing():
  """Whatever fills the padding columns, the real positions' logits are the same."""
  cfg = _cfg()
  net = Decoder(cfg.model, cfg.moe, nnx.Rngs(0))
  prompt_BxP = np.array([[0, 0, 0, 5, 6, 7], [1, 2, 3, 4, 5, 6]], np.int32)
  other_BxP = prompt_BxP.copy()
  other_BxP[0, :3] = [60, 61, 62]
  start_B = jnp.asarray([3, 0], jnp.int32)
  graphdef, state = nnx.split(net)
  cache = kv_cache.init(cfg.model, start_B, 8)
  a, b = (np.asarray(_cached(graphdef, state, jnp.asarray(t), cache)[0])
          for t in (prompt_BxP, other_BxP))
  np.testing.assert_allclose(a[0, 3:], b[0, 3:], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(a[1], b[1])


def test_window_positions_and_mask_by_hand():
  cache = kv_cache.init(_cfg().model, jnp.asarray([2, 0]), 5)
  at = kv_cache.window(cache._replace(index=jnp.int32(3)), 2)
  np.testing.assert_array_equal(at.positions_BxT, [[1, 2], [3, 4]])
  np.testing.assert_array_equal(at.mask_BxTxL[0], [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
  np.testing.assert_array_equal(at.mask_BxTxL[1], [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
  at0 = kv_cache.window(cache, 3)  # a padding column attends only to itself
  np.testing.assert_array_equal(at0.mask_BxTxL[0], [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0],
                                                    [0, 0, 1, 0, 0]])
  np.testing.assert_array_equal(at0.positions_BxT[0], [0, 0, 0])
