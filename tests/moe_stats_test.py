"""Tests for moex/moe/stats.py on hand-built routings and counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moex.moe import dispatch, routing, stats

nnx.use_eager_sharding(False)

E, K, L = 4, 2, 4  # experts, top-k, tokens per group (sequence)
TRAIN_C = 3  # ceil(1.5 * L * K / E)

# Two steps of 2 sequences; every row sums to L * K = 8 assignments.
LOAD_STEP1_GxE = [[5, 1, 2, 0], [2, 2, 2, 2]]
LOAD_STEP2_GxE = [[1, 1, 6, 0], [3, 1, 2, 2]]


# The training plan of these tests: capacity TRAIN_C at factor 1.5.
PLAN = dispatch.Plan(path="capacity", capacity_factor=1.5, capacity=TRAIN_C,
                     tokens_per_group=L, num_experts=E, top_k=K, min_capacity=0,
                     train_capacity_factor=1.5, train_capacity=TRAIN_C)
DROPLESS = dataclasses.replace(PLAN, path="dropless", capacity_factor=None, capacity=None)
GATHER = dataclasses.replace(DROPLESS, path="gather")


def _routing(expert_GxSxK, probs_GxSxE=None) -> routing.Routing:
  index = jnp.asarray(expert_GxSxK, jnp.int32)
  g, s, k = index.shape
  if probs_GxSxE is None:
    probs_GxSxE = jnp.full((g, s, E), 1.0 / E, jnp.float32)
  probs_GxSxE = jnp.asarray(probs_GxSxE, jnp.float32)
  return routing.Routing(index, jnp.full((g, s, k), 1.0 / k, jnp.float32), probs_GxSxE,
                         jnp.log(probs_GxSxE))


def _routing_with_load(load_GxE) -> routing.Routing:
  """A routing whose per-group loads are `load_GxE` (each row sums to L * K)."""
  index_GxM = [np.repeat(np.arange(E), row) for row in load_GxE]
  return _routing(np.asarray(index_GxM).reshape(len(load_GxE), L, K))


def _step(load_GxE, capacity, entropy_sum, lb, z):
  """One step's stats for these loads, dropped beyond `capacity` (None: dropless); the
  balancing terms set by hand, so the records' host arithmetic is checked on known values."""
  r = _routing_with_load(load_GxE)
  if capacity:
    kept_GxSxK = dispatch.capacity_positions(r.expert_index_GxSxK, E) < capacity
  else:
    kept_GxSxK = jnp.ones(r.expert_index_GxSxK.shape, bool)
  s = stats.layer_stats(r, kept_GxSxK, PLAN if capacity else DROPLESS)
  return dict(s, entropy_sum=jnp.float32(entropy_sum), load_balance_loss=jnp.float32(lb),
              z_loss=jnp.float32(z))


def _stack(*per_layer):
  return jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *per_layer)


def _records(window, **kw):
  args = dict(step=10, split="train", layers=(1,), plan=PLAN)
  args.update(kw)
  return stats.records(window, **args)


def test_layer_stats_balancing_terms_match_balancing_formulas():
  # The loss reads its balancing terms from layer_stats: they are balancing.py's formulas.
  from moex.moe import balancing  # pylint: disable=g-import-not-at-top
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (2, L, E)), axis=-1)
  r = _routing(jnp.argsort(-probs, axis=-1)[..., :K], probs)
  s = stats.layer_stats(r, jnp.ones(r.expert_index_GxSxK.shape, bool), PLAN)
  load_GxE = balancing.routed_load(r)
  assert float(s["load_balance_loss"]) == pytest.approx(
      float(balancing.load_balance_loss(r, load_GxE.sum(0))))
  assert float(s["seq_load_balance_loss"]) == pytest.approx(
      float(balancing.sequence_load_balance_loss(r, load_GxE)))
  assert float(s["z_loss"]) == pytest.approx(float(balancing.z_loss(r)))
  assert float(s["entropy_sum"]) == pytest.approx(float(balancing.router_entropy_sum(r)))
  np.testing.assert_array_equal(s["expert_load"], load_GxE.sum(0))


def test_layer_stats_kept_and_overflow_follow_dispatch_kept():
  # Whatever dispatch did not keep is dropped; on the dropless path that can only be the
  # bounded expert-parallel buffer, so it is also ep_overflow.
  r = _routing_with_load(LOAD_STEP1_GxE)
  kept_GxSxK = np.ones(r.expert_index_GxSxK.shape, bool)
  kept_GxSxK[0, 0, 0] = kept_GxSxK[1, 3, 1] = False  # experts 0 and 3
  s = stats.layer_stats(r, jnp.asarray(kept_GxSxK), DROPLESS)
  np.testing.assert_array_equal(s["expert_kept"], [6, 3, 4, 1])
  np.testing.assert_array_equal(s["ep_overflow"], [1, 0, 0, 1])
  s = stats.layer_stats(r, jnp.asarray(kept_GxSxK), PLAN)
  np.testing.assert_array_equal(s["expert_kept"], [6, 3, 4, 1])
  np.testing.assert_array_equal(s["ep_overflow"], [0, 0, 0, 0])


def test_gather_path_counts_its_expert_parallel_overflow_as_ep_overflow():
  # The gather path (a decode step) runs through the same bounded expert-parallel exchange
  # as dropless (moex/moe/parallel.py _ep_gathered): what it did not keep is overflow, all
  # of it ep_overflow (kept + overflow = load), none of it a capacity drop.
  r = _routing_with_load(LOAD_STEP1_GxE)
  kept_GxSxK = np.ones(r.expert_index_GxSxK.shape, bool)
  kept_GxSxK[0, 0, 0] = kept_GxSxK[1, 3, 1] = False  # experts 0 and 3
  s = stats.layer_stats(r, jnp.asarray(kept_GxSxK), GATHER)
  np.testing.assert_array_equal(s["ep_overflow"], [1, 0, 0, 1])
  capacity_dropped_E = s["expert_load"] - s["expert_kept"] - s["ep_overflow"]
  np.testing.assert_array_equal(capacity_dropped_E, [0, 0, 0, 0])
  (rec,) = _records(_stack(s), plan=GATHER)
  assert (rec["dispatch"], rec["ep_overflow"]) == ("gather", 2)


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
  recs = _records(_stack(dropless, capped), split="eval", layers=(0, 2), plan=DROPLESS)
  assert [r["layer"] for r in recs] == [0, 2]
  r0, r2 = recs
  assert r0["split"] == "eval" and r0["capacity"] is None and r0["capacity_factor"] is None
  assert r0["dispatch"] == "dropless"
  # What the report needs to recompute the capacity at any factor (moex.config.capacity).
  assert (r0["tokens_per_group"], r0["min_capacity"], r0["top_k"]) == (L, 0, K)
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
  s = stats.layer_stats(_routing(index, probs), jnp.ones(index.shape, bool),
                        dataclasses.replace(DROPLESS, tokens_per_group=3))
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
  # Padding of packed probe rows (first choice -1) is no probe token: layer 0 changes 1 of
  # its 3 real tokens, layer 1 both of its 2.
  prev_pad = np.array([[[0, 1], [2, -1]], [[1, -1], [1, -1]]])
  cur_pad = np.array([[[0, 1], [3, -1]], [[0, -1], [3, -1]]])
  np.testing.assert_allclose(stats.routing_churn(prev_pad, cur_pad), [1 / 3, 1.0])


def test_records_routing_churn_field():
  window = _stack(_step(LOAD_STEP1_GxE, TRAIN_C, 1.0, 1.0, 1.0),
                  _step(LOAD_STEP2_GxE, TRAIN_C, 1.0, 1.0, 1.0))
  recs = _records(window, layers=(1, 3), churn_N=np.array([0.25, 0.5]))
  assert [r["routing_churn"] for r in recs] == [0.25, 0.5]
  assert all(r["routing_churn"] is None for r in _records(window, layers=(1, 3)))


@pytest.mark.slow
def test_gather_path_on_expert_ranks_reports_its_overflow():
  """tests/multidevice/stats_mesh.py: a decode-sized evaluation call (the gather path) on 2
  expert ranks with moe.ep_buffer_factor=0.5 overflows its pair buffers; the overflow is
  ep_overflow (kept + overflow = load), and one device never overflows."""
  import multidevice_run  # pylint: disable=g-import-not-at-top
  stdout, rows = multidevice_run.run("stats_mesh.py")
  one, two = sorted(rows, key=lambda r: r["ranks"])
  assert one["path"] == two["path"] == "gather", stdout
  assert one["overflow"] == 0 and one["kept"] == one["load"], one
  assert two["overflow"] > 0, two
  assert two["kept"] + two["overflow"] == two["load"] == one["load"], two
