"""Tests for capacity, drops and drop policies (moex/moe/dispatch.py, moex/moe/layer.py).

Hand-built routings whose survivors are written out literally, then MoEBlock with drops
against the reference in moe_reference.py (output and gradients at 1e-5).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from moe_reference import (
  EDGE_ROUTERS,
  JIT_OPTIONS,
  build_block,
  compare_with_reference,
  random_bias,
  random_weights,
  random_x,
  run_block,
  run_edge_case,
  small_cfgs,
)

from moex.config import MoEConfig
from moex.moe import dispatch, routing, stats

nnx.use_eager_sharding(False)


TOL = dict(rtol=1e-5, atol=1e-5)
SCALE_E = (2.0, 3.0, 5.0)  # the hand experts: expert e multiplies its rows by SCALE_E[e]


def _scale_experts(buf_ExRxD):
  return buf_ExRxD * jnp.asarray(SCALE_E[:buf_ExRxD.shape[0]])[:, None, None]


_capacity_dispatch = jax.jit(dispatch.capacity_dispatch, static_argnums=(2, 3, 5),
                             **JIT_OPTIONS)
_positions = jax.jit(dispatch.capacity_positions, static_argnums=(1,), **JIT_OPTIONS)


def _routing(expert_GxSxK, weight_GxSxK, e: int) -> routing.Routing:
  index = jnp.asarray(expert_GxSxK, jnp.int32)
  g, s, _ = index.shape
  return routing.Routing(index, jnp.asarray(weight_GxSxK, jnp.float32),
                         jnp.full((g, s, e), 1.0 / e, jnp.float32),
                         jnp.zeros((g, s, e), jnp.float32))


def _hand_dispatch(expert, weight, capacity, policy, renormalize=False):
  """(y / x per token [G, S], kept [G, S, K]) for x = ones: the factor each token got."""
  r = _routing(expert, weight, 3)
  g, s, _ = r.expert_index_GxSxK.shape
  x = jnp.ones((g, s, 2), jnp.float32)
  priority = r.combine_weight_GxSxK if policy == "probability" else None
  y, kept = _capacity_dispatch(x, r, capacity, _scale_experts, priority, renormalize)
  np.testing.assert_allclose(y[..., 0], y[..., 1])
  return np.asarray(y[..., 0]), np.asarray(kept)


# One sequence, E=3, K=2, capacity 1 (experts scale by 2, 3, 5):
#   position:    choice 0 by position: t0->e0 kept, t1->e0 drop, t2->e1 kept, t3->e1 drop;
#                choice 1: t0->e1 drop, t1->e2 kept, t2->e2 drop, t3->e0 drop.
#   probability: choice 0 by weight 0.9 t1->e0, 0.8 t3->e1 kept, 0.7 t2->e1, 0.5 t0->e0 drop;
#                choice 1 by weight 0.5 t0->e1 drop, 0.3 t2->e2 kept, 0.2 t3->e0, 0.1 t1->e2.
EXPERT = [[0, 1], [0, 2], [1, 2], [1, 0]]
WEIGHT = [[0.5, 0.5], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]]
KEPT = {"position": [[True, False], [False, True], [True, False], [False, False]],
        "probability": [[False, False], [True, False], [False, True], [True, False]]}
FACTOR = {"position": [0.5 * 2, 0.1 * 5, 0.7 * 3, 0.0],
          "probability": [0.0, 0.9 * 2, 0.3 * 5, 0.8 * 3]}
# renormalize: a survivor carries its token's whole weight (1.0); all dropped -> 0.
FACTOR_RENORMALIZED = {"position": [2.0, 5.0, 3.0, 0.0], "probability": [0.0, 2.0, 5.0, 3.0]}


@pytest.mark.parametrize("policy", ["position", "probability"])
def test_drop_policy_by_hand(policy):
  factor, kept = _hand_dispatch([EXPERT], [WEIGHT], 1, policy)
  np.testing.assert_array_equal(kept[0], KEPT[policy])
  np.testing.assert_allclose(factor[0], FACTOR[policy], rtol=1e-6)
  factor, kept = _hand_dispatch([EXPERT], [WEIGHT], 1, policy, renormalize=True)
  np.testing.assert_array_equal(kept[0], KEPT[policy])
  np.testing.assert_allclose(factor[0], FACTOR_RENORMALIZED[policy], rtol=1e-6)


def test_probability_slots_by_hand():
  # Slots in each expert's buffer under the probability order (see the comment above).
  slots = _positions(jnp.asarray([EXPERT], jnp.int32), 3, jnp.asarray([WEIGHT]))
  np.testing.assert_array_equal(slots[0], [[1, 2], [0, 1], [1, 0], [0, 2]])


def test_groups_are_independent_and_probability_ignores_position():
  # Group 1 is group 0 with its tokens reversed: the probability policy keeps the same
  # assignments (reversed); the position policy now favours the other tokens.
  expert, weight = [EXPERT, EXPERT[::-1]], [WEIGHT, WEIGHT[::-1]]
  _, kept = _hand_dispatch(expert, weight, 1, "probability")
  np.testing.assert_array_equal(kept[1], np.asarray(KEPT["probability"])[::-1])
  _, kept = _hand_dispatch(expert, weight, 1, "position")
  np.testing.assert_array_equal(kept[0], KEPT["position"])
  # Reversed: t3->e1 kept, t2->e1 drop, t1->e0 kept, t0->e0 drop; then t3's second (e0)
  # drop, t2's second (e2) kept, t1's second (e2) drop, t0's second (e1) drop.
  np.testing.assert_array_equal(kept[1], [[True, False], [False, True], [True, False],
                                          [False, False]])


def test_probability_keeps_first_choices_before_second():
  # E=2 (scales 2, 3), K=2, capacity 2. t3's second choice (expert 0, weight 0.8) outweighs
  # the first choices of t0 (0.6) and t2 (0.55) for expert 0, yet they win the two slots:
  # priority is by weight only within a choice level.
  expert = [[[0, 1], [1, 0], [0, 1], [1, 0]]]
  weight = [[[0.6, 0.4], [0.9, 0.1], [0.55, 0.45], [0.2, 0.8]]]
  factor, kept = _hand_dispatch(expert, weight, 2, "probability")
  np.testing.assert_array_equal(kept[0], [[True, False]] * 4)
  np.testing.assert_allclose(factor[0], [0.6 * 2, 0.9 * 3, 0.55 * 2, 0.2 * 3], rtol=1e-6)


def test_renormalized_by_hand():
  # Weights that do not sum to 1 (routed_scaling): survivors are scaled to the original sum.
  w = jnp.asarray([[[1.2, 0.3], [0.5, 0.5], [0.4, 0.6]]])
  kept = jnp.asarray([[[False, True], [False, False], [True, True]]])
  np.testing.assert_allclose(dispatch.renormalized(w, kept)[0],
                             [[0.0, 1.5], [0.0, 0.0], [0.4, 0.6]], rtol=1e-6)


def test_capacity_arithmetic_and_min_capacity():
  cap = lambda s, k, e, cf, m: MoEConfig(num_experts=e, top_k=k, min_capacity=m).capacity(s, cf)
  assert cap(8, 2, 4, 1.0, 0) == 4  # ceil(1.0 * 8 * 2 / 4)
  assert cap(8, 2, 4, 1.25, 0) == 5
  assert cap(8, 2, 4, 0.01, 0) == 1  # never below 1 when anything is routed
  assert cap(8, 2, 4, 0.01, 3) == 3  # min_capacity wins
  assert cap(8, 2, 4, 2.0, 3) == 8  # ... only when larger
  assert cap(3, 2, 8, 1.0, 4) == 4  # ceil(0.75) = 1 < 4


@pytest.mark.parametrize("router,policy,renormalize", [
    ("softmax_topk", "probability", False),
    ("sigmoid_bias", "probability", True),  # its weights are not sorted by choice
    ("topk_softmax", "position", True),
    ("hash", "probability", False),  # equal weights: position order within a choice
])
def test_drop_policies_in_block_match_reference_with_grads(router, policy, renormalize):
  b, l, e = 2, 8, 4
  moe = small_cfgs(router=router, dispatch="capacity", capacity_factor=0.5,
                   drop_policy=policy, renormalize_after_drop=renormalize,
                   routed_scaling=2.5 if router == "sigmoid_bias" else 1.0)[1]
  c = moe.capacity(l, 0.5)
  assert c == 2
  w = random_weights(e, seed=21)
  x, ct = random_x(b, l, seed=22), random_x(b, l, seed=23)
  tokens = jnp.asarray(np.arange(b * l).reshape(b, l) * 5, jnp.int32)
  bias = random_bias(e) if router == "sigmoid_bias" else None
  _, s, _ = compare_with_reference(moe, w, x, ct, tokens, capacity=c, bias_E=bias)
  assert np.sum(s["expert_kept"]) < np.sum(s["expert_load"])  # something was dropped


def test_min_capacity_in_block():
  b, l, e = 2, 8, 4
  moe = small_cfgs(dispatch="capacity", capacity_factor=0.01, min_capacity=3)[1]
  w = random_weights(e, seed=24)
  x, ct = random_x(b, l, seed=25), random_x(b, l, seed=26)
  _, s, _ = compare_with_reference(moe, w, x, ct, capacity=3)
  assert np.all(np.asarray(s["expert_kept"]) <= b * 3)
  assert np.sum(s["expert_kept"]) < np.sum(s["expert_load"])


# Every router of every case with drops, except: random (the order of its choices is
# unknown, so drops cannot be predicted), hash with K = E (same), and topk_softmax
# (moe_layer_test.py runs these cases for it).
CAPACITY_EDGE_GRID = [(case, r) for case, routers in EDGE_ROUTERS.items() for r in routers
                      if r not in ("random", "topk_softmax")
                      and not (r == "hash" and case == "k_equals_e")]


@pytest.mark.parametrize("case,router", CAPACITY_EDGE_GRID)
def test_edge_cases_with_drops_match_reference_with_grads(case, router):
  # few_tokens has capacity 1; see moe_reference.EDGE_CASES.
  run_edge_case(case, router, "capacity")


def _records(s, split: str, moe: MoEConfig, l: int, dispatch_name: str, cf):
  host = jax.tree.map(lambda a: np.asarray(a)[None], s)  # one MoE layer
  return stats.records(host, step=0, split=split, layers=(0,), top_k=moe.top_k,
                       dispatch=dispatch_name, capacity=moe.capacity(l, cf) if cf else None,
                       capacity_factor=cf, train_capacity=moe.capacity(l, moe.capacity_factor),
                       train_capacity_factor=moe.capacity_factor, tokens_per_group=l)[0]


def test_train_capacity_eval_dropless_and_eval_stats():
  # Training drops (C = 2 of 8 tokens); eval_capacity_factor = 0 (the default) is dropless.
  b, l, e = 2, 8, 4
  moe = small_cfgs(dispatch="capacity", capacity_factor=0.5)[1]
  assert moe.eval_capacity_factor == 0.0
  w = random_weights(e, seed=27)
  x = random_x(b, l, seed=28)
  _, s_train, _ = compare_with_reference(moe, w, x, None, capacity=2, train=True)
  _, s_eval, _ = compare_with_reference(moe, w, x, None, capacity=None, train=False)
  np.testing.assert_array_equal(s_eval["expert_kept"], s_eval["expert_load"])
  # Eval statistics still say what the training capacity would have dropped.
  np.testing.assert_array_equal(s_eval["train_capacity_kept"], s_train["expert_kept"])
  rec_train = _records(s_train, "train", moe, l, "capacity", 0.5)
  rec_eval = _records(s_eval, "eval", moe, l, "dropless", None)
  assert rec_eval["dropped_fraction"] == 0.0 and rec_eval["capacity"] is None
  assert rec_train["dropped_fraction"] > 0
  assert rec_eval["train_capacity_dropped_fraction"] == pytest.approx(
      rec_train["dropped_fraction"])
  assert rec_eval["train_capacity"] == 2 and rec_eval["train_capacity_factor"] == 0.5


def test_eval_capacity_factor():
  # eval_capacity_factor > 0: evaluation drops with C = ceil(0.25 * 8 * 2 / 4) = 1.
  b, l, e = 2, 8, 4
  moe = small_cfgs(dispatch="dropless", grouped_matmul="tiled", capacity_factor=2.0,
                   eval_capacity_factor=0.25)[1]
  w = random_weights(e, seed=29)
  x = random_x(b, l, seed=30)
  _, s, _ = compare_with_reference(moe, w, x, None, capacity=1, train=False)
  assert np.sum(s["expert_kept"]) < np.sum(s["expert_load"])


@pytest.mark.parametrize("eval_cf,c_eval", [(0.5, 2), (0.0, 4)])
def test_expert_choice_eval_capacity(eval_cf, c_eval):
  # Expert choice is always capacity-bound: eval uses eval_capacity_factor, or the
  # training factor when that is 0 (C = ceil(cf * 8 * 2 / 4)).
  b, l, e = 2, 8, 4
  moe = small_cfgs(router="expert_choice", allow_noncausal_routing=True, capacity_factor=1.0,
                   eval_capacity_factor=eval_cf)[1]
  w = random_weights(e, seed=31)
  x = random_x(b, l, seed=32)
  _, s, _ = compare_with_reference(moe, w, x, None, capacity=c_eval, train=False)
  np.testing.assert_array_equal(s["expert_load"], [b * c_eval] * e)


@pytest.mark.parametrize("router", ["topk_softmax", "softmax_topk", "sigmoid_bias", "hash",
                                    "random"])
def test_dropless_equals_capacity_that_drops_nothing(router):
  # The largest per-sequence load is the smallest capacity that drops nothing: there the
  # capacity path equals the dropless one; one slot less drops something.
  b, l, e = 2, 8, 4
  moe = small_cfgs(router=router, dispatch="dropless", grouped_matmul="chunked",
                   capacity_factor=0.01)[1]
  w = random_weights(e, seed=33)
  x = random_x(b, l, seed=34)
  tokens = jnp.asarray(np.random.default_rng(35).integers(0, 50, (b, l)), jnp.int32)
  bias = random_bias(e) if router == "sigmoid_bias" else None
  y_free, s_free, _ = run_block(build_block(moe, w, bias), x, train=True, tokens=tokens)
  needed = int(s_free["max_group_load"])
  assert needed > 1
  cap = dataclasses.replace(moe, dispatch="capacity", min_capacity=needed)
  y_cap, s_cap, _ = run_block(build_block(cap, w, bias), x, train=True, tokens=tokens)
  np.testing.assert_allclose(y_cap, y_free, **TOL)
  np.testing.assert_array_equal(s_cap["expert_kept"], s_cap["expert_load"])
  np.testing.assert_array_equal(s_cap["expert_load"], s_free["expert_load"])
  tight = dataclasses.replace(cap, min_capacity=needed - 1)
  y_tight, s_tight, _ = run_block(build_block(tight, w, bias), x, train=True, tokens=tokens)
  assert np.sum(s_tight["expert_kept"]) < np.sum(s_tight["expert_load"])
  assert np.max(np.abs(np.asarray(y_tight) - np.asarray(y_free))) > 1e-3
