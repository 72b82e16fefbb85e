"""Tests for moex/moe/stats.py on hand-built counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moex.moe import stats

nnx.use_eager_sharding(False)

E, K, L = 4, 2, 4  # experts, top-k, tokens per group (sequence)
TRAIN_C = 3  # ceil(1.5 * L * K / E)

# Two steps of 2 sequences; every row sums to L * K = 8 assignments.
LOAD_STEP1_GxE = [[5, 1, 2, 0], [2, 2, 2, 2]]
LOAD_STEP2_GxE = [[1, 1, 6, 0], [3, 1, 2, 2]]


def _step(load_GxE, capacity, entropy_sum, lb, z):
  load = jnp.asarray(load_GxE, jnp.int32)
  kept_E = jnp.sum(jnp.minimum(load, capacity), axis=0) if capacity else jnp.sum(load, 0)
  return stats.layer_stats(load, kept_E, TRAIN_C, jnp.float32(entropy_sum), jnp.float32(lb),
                           jnp.float32(z))


def _stack(*per_layer):
  return jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *per_layer)


def _records(window, **kw):
  args = dict(step=10, split="train", layers=(1,), top_k=K, dispatch="capacity",
              capacity=TRAIN_C, capacity_factor=1.5, train_capacity=TRAIN_C,
              train_capacity_factor=1.5, tokens_per_group=L)
  args.update(kw)
  return stats.records(window, **args)


def test_layer_stats_counts():
  s = _step(LOAD_STEP1_GxE, TRAIN_C, 4.0, 1.25, 3.0)
  np.testing.assert_array_equal(s["expert_load"], [7, 3, 4, 2])
  np.testing.assert_array_equal(s["expert_kept"], [5, 3, 4, 2])
  np.testing.assert_array_equal(s["train_capacity_kept"], [5, 3, 4, 2])
  assert int(s["max_group_load"]) == 5 and int(s["steps"]) == 1
  assert s["expert_kept"].dtype == jnp.int32 and s["entropy_sum"].dtype == jnp.float32


def test_records_one_step():
  window = _stack(_step(LOAD_STEP1_GxE, TRAIN_C, 4.0, 1.25, 3.0))
  (rec,) = _records(window)
  assert rec["step"] == 10 and rec["split"] == "train" and rec["layer"] == 1
  assert rec["tokens"] == 8  # 16 assignments / K
  assert rec["num_experts"] == E and rec["top_k"] == K
  assert rec["expert_load"] == [7, 3, 4, 2] and rec["expert_kept"] == [5, 3, 4, 2]
  assert rec["dropped_fraction"] == pytest.approx(2 / 16)
  # Max per-sequence load * E / (L * K) = 5 * 4 / 8.
  assert rec["needed_capacity_factor"] == pytest.approx(2.5)
  assert rec["router_entropy"] == pytest.approx(4.0 / 8)
  assert rec["load_balance_loss"] == pytest.approx(1.25)
  assert rec["z_loss"] == pytest.approx(3.0)
  assert rec["train_capacity_dropped_fraction"] == pytest.approx(2 / 16)
  assert rec["capacity"] == TRAIN_C and rec["capacity_factor"] == 1.5


def test_accumulate_sums_counts_and_maxes_group_load():
  s1 = _step(LOAD_STEP1_GxE, TRAIN_C, 4.0, 1.0, 2.0)
  s2 = _step(LOAD_STEP2_GxE, TRAIN_C, 6.0, 3.0, 4.0)
  acc = stats.accumulate(stats.accumulate(stats.zeros_like(s1), s1), s2)
  np.testing.assert_array_equal(acc["expert_load"], [7 + 4, 3 + 2, 4 + 8, 2 + 2])
  # Step 2 kept: min(load, 3) = [1,1,3,0] + [3,1,2,2].
  np.testing.assert_array_equal(acc["expert_kept"], [5 + 4, 3 + 2, 4 + 5, 2 + 2])
  assert int(acc["max_group_load"]) == 6  # max over steps, not 5 + 6
  assert int(acc["steps"]) == 2
  assert float(acc["entropy_sum"]) == pytest.approx(10.0)
  (rec,) = _records(_stack(acc))
  assert rec["tokens"] == 16
  assert rec["dropped_fraction"] == pytest.approx(1 - 27 / 32)
  assert rec["needed_capacity_factor"] == pytest.approx(6 * E / (L * K))
  assert rec["router_entropy"] == pytest.approx(10.0 / 16)
  assert rec["load_balance_loss"] == pytest.approx(2.0)  # mean over the 2 steps
  assert rec["z_loss"] == pytest.approx(3.0)
  assert rec["train_capacity_dropped_fraction"] == pytest.approx(1 - 27 / 32)


def test_records_dropless_and_several_layers():
  # Layer 0 dropless (kept = load); layer 2 ran with capacity. Eval split, no capacity.
  dropless = _step(LOAD_STEP1_GxE, None, 8.0, 1.0, 1.0)
  capped = _step(LOAD_STEP2_GxE, TRAIN_C, 2.0, 1.0, 1.0)
  recs = _records(_stack(dropless, capped), split="eval", layers=(0, 2), dispatch="dropless",
                  capacity=None, capacity_factor=None)
  assert [r["layer"] for r in recs] == [0, 2]
  r0, r2 = recs
  assert r0["split"] == "eval" and r0["capacity"] is None and r0["capacity_factor"] is None
  assert r0["expert_kept"] == r0["expert_load"] == [7, 3, 4, 2]
  assert r0["dropped_fraction"] == 0.0
  # What training (C=3) would have dropped on these tokens.
  assert r0["train_capacity_dropped_fraction"] == pytest.approx(2 / 16)
  assert r0["router_entropy"] == pytest.approx(1.0)
  assert r2["expert_load"] == [4, 2, 8, 2] and r2["expert_kept"] == [4, 2, 5, 2]
  assert r2["dropped_fraction"] == pytest.approx(3 / 16)
  assert r2["needed_capacity_factor"] == pytest.approx(3.0)


def test_records_empty_window():
  window = _stack(stats.zeros_like(_step(LOAD_STEP1_GxE, TRAIN_C, 1.0, 1.0, 1.0)))
  (rec,) = _records(window)
  assert rec["tokens"] == 0 and rec["dropped_fraction"] == 0.0
  assert rec["train_capacity_dropped_fraction"] == 0.0
  assert rec["router_entropy"] == 0.0 and rec["load_balance_loss"] == 0.0


def test_topk_margin_and_cooccurrence_on_a_hand_built_routing():
  # 3 tokens, E=4, K=2. Probabilities sorted per token: gaps p(2) - p(3) = .2, .1, 0.
  probs = jnp.array([[[0.5, 0.3, 0.1, 0.1], [0.4, 0.1, 0.4, 0.1], [0.25, 0.25, 0.25, 0.25]]])
  index = jnp.array([[[0, 1], [0, 2], [0, 3]]], jnp.int32)
  s = stats.routing_shape_stats(index, probs)
  assert float(s["topk_margin_sum"]) == pytest.approx(0.2 + 0.3 + 0.0)
  co = np.asarray(s["cooccurrence"])
  assert co[0, 1] == co[0, 2] == co[0, 3] == 1 and co[1, 2] == 0
  assert np.diag(co).tolist() == [3, 1, 1, 1]  # the load


def test_records_dead_experts_margin_and_pairs():
  window = _stack(_step(LOAD_STEP1_GxE, TRAIN_C, 1.0, 1.0, 1.0))
  for k in ("expert_load", "expert_kept"):
    window[k] = np.array(window[k])
    window[k][0, 3] = 0
  window["topk_margin_sum"] = jnp.array([1.6])
  co = np.zeros((1, 4, 4), np.int32)
  co[0, 0, 2] = co[0, 2, 0] = 5
  window["cooccurrence"] = jnp.asarray(co)
  (rec,) = _records(window)
  assert rec["dead_experts"] == [3]
  assert rec["topk_margin"] == pytest.approx(1.6 / rec["tokens"])
  assert [0, 2, 5] in rec["expert_cooccurrence"]["pairs"]


def test_large_expert_counts_are_summarized():
  e = 8
  load = np.arange(e, dtype=np.int64)  # expert 0 dead
  out = stats._per_expert(load, max_experts=4)
  assert out["summary"] and out["sum"] == int(load.sum()) and out["count"] == e
  assert out["percentiles"]["100"] == 7.0 and sum(out["histogram"]["counts"]) == e
  assert stats._dead(load, max_experts=4) == {"count": 1}
  assert stats._per_expert(load, max_experts=8) == load.tolist()
  co = np.ones((40, 40), np.int32)
  top = stats._cooccurrence(co, max_experts=64)
  assert len(top["top_pairs"]) == 16 and top["total_pairs"] == 40 * 39 // 2


def test_routing_churn_on_hand_built_first_choices():
  # Two MoE layers, 2 sequences of 2 tokens: layer 0 changes 1 of 4 tokens, layer 1 all 4.
  prev = np.array([[[0, 1], [2, 3]], [[1, 1], [1, 1]]])
  cur = np.array([[[0, 1], [3, 3]], [[0, 2], [3, 0]]])
  np.testing.assert_allclose(stats.routing_churn(prev, cur), [0.25, 1.0])
  np.testing.assert_allclose(stats.routing_churn(prev, prev), [0.0, 0.0])
  with pytest.raises(ValueError, match="probe shapes differ"):
    stats.routing_churn(prev, cur[:, :1])


def test_records_routing_churn_field():
  window = _stack(_step(LOAD_STEP1_GxE, TRAIN_C, 1.0, 1.0, 1.0),
                  _step(LOAD_STEP2_GxE, TRAIN_C, 1.0, 1.0, 1.0))
  recs = _records(window, layers=(1, 3), churn_N=np.array([0.25, 0.5]))
  assert [r["routing_churn"] for r in recs] == [0.25, 0.5]
  assert all(r["routing_churn"] is None for r in _records(window, layers=(1, 3)))
