"""Tests for moex/moe/routing.py: every router through MoEBlock against moe_reference.py.

Each router x dispatch path is compared with the token-by-token reference, output and
gradients (x and every weight) at 1e-5; then the routers' own properties (group-limited
choice by hand, hash consistency, determinism, jitter). Shared experts: moe_layer_test.py.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from moe_reference import (
  EDGE_ROUTERS,
  build_block,
  compare_with_reference,
  infer_uniform_choices,
  random_bias,
  random_weights,
  random_x,
  reference_choices,
  run_block,
  run_edge_case,
  small_cfgs,
)

from moex.config import MoEConfig
from moex.moe import routing

nnx.use_eager_sharding(False)


TOL = dict(rtol=1e-5, atol=1e-5)

# name -> MoEConfig overrides. sigmoid_bias also gets a non-zero balancing bias (below),
# so the choice differs from the plain top-k of the sigmoid.
ROUTERS = {
    "topk_softmax": dict(router="topk_softmax"),
    "softmax_topk": dict(router="softmax_topk"),
    "softmax_topk_renormalized": dict(router="softmax_topk", renormalize=True,
                                      routed_scaling=1.5),
    "switch": dict(router="switch", top_k=1),
    "sigmoid_bias": dict(router="sigmoid_bias", routed_scaling=2.5),
    "sigmoid_bias_grouped": dict(router="sigmoid_bias", num_experts=8, num_groups=4,
                                 topk_groups=2),
    "hash": dict(router="hash"),
    "random": dict(router="random"),
}
# (dispatch, grouped_matmul); capacity runs with a capacity that drops nothing.
PATHS = [("capacity", "auto"), ("dropless", "ragged_dot"), ("dropless", "tiled"),
         ("dropless", "chunked")]
# The two router variants run on one path each (this file's time budget).
_VARIANT_PATHS = {"softmax_topk_renormalized": [("capacity", "auto")],
                  "sigmoid_bias_grouped": [("dropless", "chunked")]}


@pytest.mark.parametrize("name", list(ROUTERS))
def test_router_matches_reference_with_grads_on_every_path(name):
  # One test per router, looping over the paths, so the reference compiles once.
  e = ROUTERS[name].get("num_experts", 4)
  b, l = 2, 8
  w = random_weights(e, seed=1)
  x, ct = random_x(b, l), random_x(b, l, seed=7)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 6, (b, l)), jnp.int32)
  bias = random_bias(e) if ROUTERS[name]["router"] == "sigmoid_bias" else None
  paths = _VARIANT_PATHS.get(name, PATHS)
  results = {}
  for path, backend in paths:
    moe = small_cfgs(**ROUTERS[name], dispatch=path, grouped_matmul=backend,
                     capacity_factor=float(e))[1]  # C = L*K: nothing can be dropped
    y, s, choices = compare_with_reference(moe, w, x, ct, tokens, capacity=None, bias_E=bias,
                                           check_twice=True)
    np.testing.assert_array_equal(s["expert_kept"], s["expert_load"])
    results[path, backend] = y, choices
  all_choices = [c for _, c in results.values()]
  for c in all_choices[1:]:  # every path saw the same routing
    np.testing.assert_array_equal(np.sort(c, -1), np.sort(all_choices[0], -1))
  choices = all_choices[0]
  if moe.router == "hash":  # same token id -> same experts, wherever it stands
    tok = np.asarray(tokens)
    for t in np.unique(tok):
      np.testing.assert_array_equal(choices[tok == t], np.repeat(
          choices[tok == t][:1], int(np.sum(tok == t)), axis=0))
  if moe.router == "sigmoid_bias":
    # The bias, and the group limit, change some choices here (else they go untested).
    plain = reference_choices(x, w["router"], router="sigmoid_bias", top_k=moe.top_k)
    assert not np.array_equal(np.sort(choices, -1), np.sort(plain, -1))
    if moe.num_groups > 1:
      ungrouped = reference_choices(x, w["router"], router="sigmoid_bias", top_k=moe.top_k,
                                    bias_E=bias)
      assert not np.array_equal(np.sort(choices, -1), np.sort(ungrouped, -1))


@pytest.mark.parametrize("cf,c", [(1.0, 4), (4.0, 8)])
def test_expert_choice_matches_reference_with_grads(cf, c):
  # L=8, K=2, E=4: C = ceil(cf * 8 * 2 / 4); an expert never takes more than L tokens.
  b, l, e = 2, 8, 4
  moe = small_cfgs(router="expert_choice", allow_noncausal_routing=True,
                   capacity_factor=cf)[1]
  w = random_weights(e, seed=2)
  x, ct = random_x(b, l, seed=3), random_x(b, l, seed=4)
  _, s, _ = compare_with_reference(moe, w, x, ct, None, capacity=moe.capacity(l, cf),
                                   check_twice=True)
  np.testing.assert_array_equal(s["expert_load"], [b * c] * e)


# Edge cases (moe_reference.EDGE_CASES) on the case's dropless backend, each router in one
# case at least; moe_layer_test.py runs every router of every case with drops.
# (topk_softmax runs these three dropless in moe_layer_test.py.)
DROPLESS_EDGE_GRID = [("few_tokens", "sigmoid_bias"), ("few_tokens", "random"),
                      ("one_expert", "switch"), ("one_expert", "hash"),
                      ("k_equals_e", "softmax_topk"), ("k_equals_e", "hash"),
                      ("k_equals_e", "random")]
assert all(r in EDGE_ROUTERS[c] for c, r in DROPLESS_EDGE_GRID)


@pytest.mark.parametrize("case,router", DROPLESS_EDGE_GRID)
def test_edge_cases_match_reference_with_grads(case, router):
  run_edge_case(case, router, "dropless")


# A router on hand-made logits, jitted (eager op-by-op dispatch compiles every op).
_route = jax.jit(lambda name, logits, cfg, ctx: routing.ROUTERS[name](logits, cfg, ctx),
                 static_argnums=(0, 2))
_group_mask = jax.jit(routing.group_limited_mask, static_argnums=(1, 2))


def test_group_limited_routing_by_hand():
  # E=8 in 4 groups of 2; sigmoid scores chosen so that the best single experts (0: 0.95,
  # 6: 0.90) sit in groups whose two best sum lower than groups 1 and 2:
  #   group 0 {0, 1}: 0.95 + 0.05 = 1.00    group 1 {2, 3}: 0.60 + 0.55 = 1.15
  #   group 2 {4, 5}: 0.58 + 0.50 = 1.08    group 3 {6, 7}: 0.90 + 0.02 = 0.92
  scores = np.array([0.95, 0.05, 0.60, 0.55, 0.58, 0.50, 0.90, 0.02], np.float64)
  logits = jnp.asarray(np.log(scores / (1 - scores)), jnp.float32)[None, None]
  cfg = MoEConfig(num_experts=8, top_k=2, router="sigmoid_bias", num_groups=4, topk_groups=2)
  ctx = lambda bias: routing.Context(train=True, bias_E=jnp.asarray(bias, jnp.float32))

  keep = _group_mask(jnp.asarray(scores, jnp.float32)[None, None], 4, 2)
  np.testing.assert_array_equal(keep[0, 0], [False, False, True, True, True, True, False,
                                             False])
  r = _route("sigmoid_bias", logits, cfg, ctx(np.zeros(8)))
  # Top-2 of {2: 0.60, 3: 0.55, 4: 0.58, 5: 0.50}, weights normalized over the two.
  np.testing.assert_array_equal(r.expert_index_GxSxK[0, 0], [2, 4])
  np.testing.assert_allclose(r.combine_weight_GxSxK[0, 0], [0.60 / 1.18, 0.58 / 1.18],
                             rtol=1e-6)
  # Without groups the plain top-2 of the scores.
  r_flat = _route("sigmoid_bias", logits,
                  dataclasses.replace(cfg, num_groups=1, topk_groups=1), ctx(np.zeros(8)))
  np.testing.assert_array_equal(r_flat.expert_index_GxSxK[0, 0], [0, 6])
  # A bias of 0.3 on expert 5 lifts group 2 to 0.58 + 0.80 = 1.38 and expert 5 to first
  # choice; the weights still come from the unbiased scores (0.50 and 0.60).
  bias = np.zeros(8)
  bias[5] = 0.3
  r_bias = _route("sigmoid_bias", logits, dataclasses.replace(cfg, routed_scaling=2.5),
                  ctx(bias))
  np.testing.assert_array_equal(r_bias.expert_index_GxSxK[0, 0], [5, 2])
  np.testing.assert_allclose(r_bias.combine_weight_GxSxK[0, 0],
                             [2.5 * 0.50 / 1.10, 2.5 * 0.60 / 1.10], rtol=1e-6)
  # Only group 3 allowed (topk_groups=1 after a bias of 1 on expert 7): experts 6 and 7.
  bias = np.zeros(8)
  bias[7] = 1.0
  r_one = _route("sigmoid_bias", logits, dataclasses.replace(cfg, topk_groups=1), ctx(bias))
  np.testing.assert_array_equal(r_one.expert_index_GxSxK[0, 0], [7, 6])
  # Groups of one expert score by their single best.
  keep1 = _group_mask(jnp.asarray(scores, jnp.float32)[None, None], 8, 3)
  np.testing.assert_array_equal(keep1[0, 0], scores >= 0.60)


def test_hash_router_consistent_consecutive_and_spread():
  e, k = 8, 3
  cfg = MoEConfig(num_experts=e, top_k=k, router="hash")
  tokens = jnp.asarray([[5, 7, 5, 9], [9, 5, 0, 258]], jnp.int32)
  logits = jnp.zeros((2, 4, e), jnp.float32)
  r = _route("hash", logits, cfg, routing.Context(train=False, tokens_GxS=tokens))
  idx = np.asarray(r.expert_index_GxSxK)
  np.testing.assert_array_equal(idx[0, 0], idx[0, 2])  # token 5 at three places
  np.testing.assert_array_equal(idx[0, 0], idx[1, 1])
  np.testing.assert_array_equal(idx[0, 3], idx[1, 0])  # token 9
  np.testing.assert_array_equal((idx - idx[..., :1]) % e, np.broadcast_to(np.arange(k),
                                                                         idx.shape))
  np.testing.assert_allclose(r.combine_weight_GxSxK, np.full(idx.shape, 1 / k))
  # Independent of the logits and of the batch layout.
  r2 = _route("hash", (logits + jnp.arange(e, dtype=jnp.float32)).reshape(1, 8, e), cfg,
              routing.Context(train=True, tokens_GxS=tokens.reshape(1, 8)))
  np.testing.assert_array_equal(r2.expert_index_GxSxK.reshape(idx.shape), idx)
  # Spread: the first experts of 4096 token ids are close to uniform over E.
  ids = jnp.arange(4096, dtype=jnp.int32)[None]
  first = _route("hash", jnp.zeros((1, 4096, e)), cfg,
                 routing.Context(train=False, tokens_GxS=ids)).expert_index_GxSxK
  counts = np.bincount(np.asarray(first[0, :, 0]), minlength=e)
  assert counts.min() > 0.75 * 4096 / e and counts.max() < 1.25 * 4096 / e, counts


def test_random_router_distinct_uniform_and_keyed():
  e, k = 8, 3
  cfg = MoEConfig(num_experts=e, top_k=k, router="random")
  logits = jnp.zeros((4, 1024, e), jnp.float32)
  # Not through _route: its jit would trace ctx.train, which the router branches on.
  draw = lambda key: np.asarray(routing.random_router(
      logits, cfg, routing.Context(train=True, rng=jax.random.key(key))).expert_index_GxSxK)
  a, a2, b = draw(0), draw(0), draw(1)
  np.testing.assert_array_equal(a, a2)
  assert np.mean(np.any(a != b, axis=-1)) > 0.5
  assert np.all(np.sort(a, -1)[..., 1:] != np.sort(a, -1)[..., :-1])  # k distinct experts
  counts = np.bincount(a.ravel(), minlength=e)
  expected = a.size / e
  assert counts.min() > 0.9 * expected and counts.max() < 1.1 * expected, counts


def _block_and_data(router="topk_softmax", **moe_overrides):
  moe = small_cfgs(router=router, dispatch="dropless", grouped_matmul="tiled",
                   **moe_overrides)[1]
  w = random_weights(moe.num_experts, seed=11)
  return moe, w, random_x(2, 8, seed=12)


def test_random_router_at_eval_is_deterministic():
  moe, w, x = _block_and_data("random")
  block = build_block(moe, w)
  y1, s1, _ = run_block(block, x, train=False)
  y2, s2, _ = run_block(block, x, train=False)
  np.testing.assert_array_equal(y1, y2)
  np.testing.assert_array_equal(s1["expert_load"], s2["expert_load"])
  # Training draws fresh experts for a fresh key, the same ones for the same key.
  k1, k2 = jax.random.key(1), jax.random.key(2)
  y_a = run_block(block, x, train=True, rng=k1)[0]
  np.testing.assert_array_equal(y_a, run_block(block, x, train=True, rng=k1)[0])
  sets_a = infer_uniform_choices(x, w["gate"], w["up"], w["down"], y_a, moe.top_k)
  sets_b = infer_uniform_choices(x, w["gate"], w["up"], w["down"],
                                 run_block(block, x, train=True, rng=k2)[0], moe.top_k)
  assert not np.array_equal(sets_a, sets_b)


def test_random_router_at_eval_ignores_rng():
  moe, w, x = _block_and_data("random")
  block = build_block(moe, w)
  y_none = run_block(block, x, train=False)[0]
  y_key = run_block(block, x, train=False, rng=jax.random.key(5))[0]
  np.testing.assert_array_equal(y_key, y_none)


def test_jitter_in_training_only():
  moe, w, x = _block_and_data(jitter=0.5)
  plain = build_block(dataclasses.replace(moe, jitter=0.0), w)
  block = build_block(moe, w)
  keys = [jax.random.key(i) for i in range(4)]
  # Eval: no noise at all, whatever the key: bit-equal to jitter=0.
  y_plain, s_plain, _ = run_block(plain, x, train=False)
  for rng in [None] + keys[:2]:
    y, s, _ = run_block(block, x, train=False, rng=rng)
    np.testing.assert_array_equal(y, y_plain)
    np.testing.assert_array_equal(s["expert_load"], s_plain["expert_load"])
  # Training with jitter: each key its own noise; the same key the same bits.
  runs = [run_block(block, x, train=True, rng=k) for k in keys]
  np.testing.assert_array_equal(runs[0][0], run_block(block, x, train=True, rng=keys[0])[0])
  for (y_a, _, _), (y_b, _, _) in zip(runs, runs[1:]):
    assert np.max(np.abs(np.asarray(y_a) - np.asarray(y_b))) > 1e-3
  assert any(not np.array_equal(s["expert_load"], s_plain["expert_load"]) for _, s, _ in runs)


# What each ROUTERS entry declares, checked against what its function does.
DECL_G, DECL_S, DECL_E, DECL_K = 2, 8, 8, 4


@functools.lru_cache(maxsize=None)
def _dense_route(name: str, cfg: MoEConfig):
  """jit of: (logits, tokens, bias) -> each token's weight on each expert [G, S, E]
  (expert choice: the weight each expert gave it)."""

  def dense(logits_GxSxE, tokens_GxS, bias_E):
    ctx = routing.Context(train=False, rng=jax.random.key(3), tokens_GxS=tokens_GxS,
                          bias_E=bias_E, capacity=2)
    r = routing.ROUTERS[name](logits_GxSxE, cfg, ctx)
    g, s, e = logits_GxSxE.shape
    out_GxSxE = jnp.zeros((g, s, e), jnp.float32)
    gi = jnp.arange(g)[:, None, None]
    if r.expert_choice:
      return out_GxSxE.at[gi, r.token_GxExC, jnp.arange(e)[None, :, None]].add(r.weight_GxExC)
    return out_GxSxE.at[gi, jnp.arange(s)[None, :, None], r.expert_index_GxSxK].add(
        r.combine_weight_GxSxK)

  return jax.jit(dense)


def _decl_cfg(name: str, **overrides) -> MoEConfig:
  top_k = 1 if name == "switch" else DECL_K  # the switch router's own check: top_k 1
  return MoEConfig(num_experts=DECL_E, top_k=top_k, router=name, **overrides)


def _decl_inputs(seed: int = 0):
  key_l, key_t = jax.random.split(jax.random.key(seed))
  logits = jax.random.normal(key_l, (DECL_G, DECL_S, DECL_E), jnp.float32)
  tokens = jax.random.randint(key_t, (DECL_G, DECL_S), 0, 1000)
  return logits, tokens, jnp.zeros((DECL_E,), jnp.float32)


@pytest.mark.parametrize("name", list(routing.ROUTERS))
def test_declared_weight_sum_causality_and_packing_hold(name):
  spec = routing.ROUTERS[name]
  logits, tokens, bias = _decl_inputs()
  for overrides in ({"routed_scaling": 1.5}, {"routed_scaling": 1.5, "renormalize": True}):
    if name == "switch" and overrides.get("renormalize"):
      continue  # refused by its check
    cfg = _decl_cfg(name, **overrides)
    total_GxS = _dense_route(name, cfg)(logits, tokens, bias).sum(-1)
    sums = bool(np.allclose(total_GxS, 1.5, atol=1e-5))
    assert sums == spec.sums_to_scaling(cfg), (name, overrides, total_GxS)
  cfg = _decl_cfg(name)
  route = _dense_route(name, cfg)
  base = np.asarray(route(logits, tokens, bias))
  half = DECL_S // 2
  # Later tokens made the strongest candidates of every expert.
  later = logits.at[:, half:].set(10.0 * jnp.abs(logits[:, half:]) + 5.0)
  later_tokens = tokens.at[:, half:].add(7)
  causal = np.allclose(np.asarray(route(later, later_tokens, bias))[:, :half], base[:, :half])
  assert causal == spec.causal, name
  earlier = logits.at[:, :half].set(10.0 * jnp.abs(logits[:, :half]) + 5.0)
  alone = np.allclose(np.asarray(route(earlier, tokens.at[:, :half].add(7), bias))[:, half:],
                      base[:, half:])
  assert alone == (spec.causal and spec.packed_rows), name


@pytest.mark.parametrize("name", list(routing.ROUTERS))
def test_declared_bias_groups_ties_and_consecutive_hold(name):
  spec = routing.ROUTERS[name]
  cfg = _decl_cfg(name)
  route = _dense_route(name, cfg)
  logits, tokens, bias = _decl_inputs(1)
  tilted = bias.at[0].set(5.0)  # expert 0 favoured by any router that reads the bias
  uses_bias = not np.allclose(route(logits, tokens, tilted), route(logits, tokens, bias))
  assert uses_bias == spec.has_bias, name
  assert spec.group_limited == (name == "sigmoid_bias"), name  # the one group-limited router
  if spec.path is None and cfg.top_k == DECL_K:  # token choice, free top_k
    # Two copies of each of E/2 experts: equal columns, so equal logits.
    copies = jnp.concatenate([logits[..., :DECL_E // 2]] * 2, axis=-1)
    w_GxSxE = np.asarray(route(copies, tokens, bias))
    a, b = w_GxSxE[..., :DECL_E // 2], w_GxSxE[..., DECL_E // 2:]
    together = bool(np.allclose(a, b, atol=1e-6))
    assert together == spec.ties_chosen_together, name
    chosen_GxSxE = np.asarray(route(logits, tokens, bias)) > 0
    first = np.argmax(chosen_GxSxE & ~np.roll(chosen_GxSxE, 1, axis=-1), axis=-1)
    runs = (np.arange(DECL_E)[None, None] - first[..., None]) % DECL_E < cfg.top_k
    assert bool(np.all(runs == chosen_GxSxE)) == spec.consecutive, name


def test_every_router_that_is_not_replayable_is_named_so():
  # Expert choice decides per expert and hash from the token id: their routes cannot be
  # replayed (post-training's router replay asks this).
  assert routing.names(lambda r: not r.replayable) == ("hash", "expert_choice")
  assert routing.names(lambda r: r.path is not None) == ("expert_choice",)
