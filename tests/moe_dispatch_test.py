"""Tests for moex/moe/dispatch.py, on routings built by hand.

Capacity slots and buffers, what a drop contributes, the drop policies (position and
probability order), renormalization after drops, and the dropless path's sorted rows
against the capacity path that drops nothing. Survivors and factors are written out
literally.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from moe_reference import JIT_OPTIONS

from moex.config import MoEConfig
from moex.moe import dispatch, experts as experts_lib, gmm, routing

nnx.use_eager_sharding(False)


# One sequence of 4 tokens, E=2, K=2, C=2. Priority order (choice-major, then position):
#   k=0: t0->e0 slot 0, t1->e0 slot 1, t2->e0 slot 2 (drop), t3->e1 slot 0
#   k=1: t0->e1 slot 1, t1->e1 slot 2 (drop), t2->e1 slot 3 (drop), t3->e0 slot 3 (drop)
EXPERT_SxK = [[0, 1], [0, 1], [0, 1], [1, 0]]
WEIGHT_SxK = [[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.8, 0.2]]
SLOT_SxK = [[0, 1], [1, 2], [2, 3], [0, 3]]
KEPT_SxK = [[True, True], [True, False], [False, False], [True, False]]
SCALE_E = np.array([2.0, 3.0], np.float32)  # The hand experts: expert e multiplies by it.

def _plan(path: str, capacity: int | None = None, policy: str = "position",
          renormalize: bool = False) -> dispatch.Plan:
  """A plan by hand: only what the paths read is meaningful."""
  return dispatch.Plan(path=path, capacity_factor=None, capacity=capacity,
                       tokens_per_group=0, num_experts=0, top_k=0, min_capacity=0,
                       train_capacity_factor=1.0, train_capacity=0, priority=policy,
                       renormalize=renormalize)


def _grouped(fn):
  """A grouped-experts callback that computes every row (as on one device)."""
  return lambda rows_MxD, sizes_E: (fn(rows_MxD, sizes_E), jnp.ones(rows_MxD.shape[:1], bool))


# Jitted once per shape: eager dispatch compiles each of its many small ops separately.
@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5), **JIT_OPTIONS)
def capacity_dispatch(x, r, capacity, buffered, policy="position", renormalize=False):
  experts = dispatch.Experts(buffered=buffered, grouped=None)
  return dispatch.capacity_dispatch(x, r, _plan("capacity", capacity, policy, renormalize),
                                    experts)


@functools.partial(jax.jit, static_argnums=(2,))
def dropless_dispatch(x, r, grouped):
  return dispatch.dropless_dispatch(x, r, _plan("dropless"),
                                    dispatch.Experts(buffered=None, grouped=_grouped(grouped)))


def _routing(expert_GxSxK, weight_GxSxK, num_experts: int) -> routing.Routing:
  index = jnp.asarray(expert_GxSxK, jnp.int32)
  g, s, _ = index.shape
  return routing.Routing(
      expert_index_GxSxK=index,
      combine_weight_GxSxK=jnp.asarray(weight_GxSxK, jnp.float32),
      probs_GxSxE=jnp.full((g, s, num_experts), 1.0 / num_experts, jnp.float32),
      logits_GxSxE=jnp.zeros((g, s, num_experts), jnp.float32),
  )


def _scale_experts(scale_E):
  return lambda buf_ExRxD: buf_ExRxD * jnp.asarray(scale_E)[:, None, None]


def _x(g: int, s: int, d: int, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (g, s, d), jnp.float32)


def test_capacity_positions_by_hand():
  slot = dispatch.capacity_positions(jnp.asarray([EXPERT_SxK], jnp.int32), 2)
  np.testing.assert_array_equal(slot, [SLOT_SxK])


def test_capacity_positions_per_group():
  # Each group counts from zero; an unused expert never shows up.
  index = jnp.asarray([[[2, 0], [2, 0], [0, 2]], [[1, 2], [0, 1], [1, 0]]], jnp.int32)
  slot = dispatch.capacity_positions(index, 3)
  np.testing.assert_array_equal(slot, [[[0, 1], [1, 2], [0, 2]], [[0, 0], [0, 2], [1, 1]]])


def test_capacity_dispatch_by_hand():
  x = _x(1, 4, 3)
  r = _routing([EXPERT_SxK], [WEIGHT_SxK], 2)
  y, kept = capacity_dispatch(x, r, 2, _scale_experts(SCALE_E))
  np.testing.assert_array_equal(kept, [KEPT_SxK])
  # t0: both kept; t1: second dropped, first keeps 0.6 (not renormalized to 1);
  # t2: everything dropped -> exactly zero; t3: only its first choice (expert 1) kept.
  factor_S = np.array([0.7 * 2 + 0.3 * 3, 0.6 * 2, 0.0, 0.8 * 3], np.float32)
  np.testing.assert_allclose(y[0], factor_S[:, None] * np.asarray(x[0]), rtol=1e-6)
  np.testing.assert_array_equal(y[0, 2], np.zeros(3, np.float32))


def test_capacity_dispatch_buffers_by_hand():
  # Expert e's buffer holds its kept tokens in slot order; unfilled rows are zero.
  x = _x(2, 4, 3, seed=1)
  expert_GxSxK = [EXPERT_SxK, [[1, 0], [1, 0], [0, 1], [0, 1]]]
  r = _routing(expert_GxSxK, [WEIGHT_SxK] * 2, 3)

  @jax.jit
  def run(x):
    seen = {}

    def experts(buf_ExRxD):
      seen["buf"] = buf_ExRxD
      return buf_ExRxD

    _, kept = dispatch.capacity_dispatch(x, r, _plan("capacity", 2),
                                         dispatch.Experts(experts, None))
    return kept, seen["buf"]

  kept, buf = run(x)
  buf = np.asarray(buf)
  assert buf.shape == (3, 2 * 2, 3)  # [E, G*C, D]
  x = np.asarray(x)
  zero = np.zeros(3, np.float32)
  expected = [  # [expert][group] -> the C rows
      [[x[0, 0], x[0, 1]], [x[1, 2], x[1, 3]]],
      [[x[0, 3], x[0, 0]], [x[1, 0], x[1, 1]]],
      [[zero, zero], [zero, zero]],
  ]
  np.testing.assert_array_equal(buf, np.asarray(expected).reshape(3, 4, 3))
  # Group 1: e1 gets t0,t1 (k=0) then t2,t3 (k=1, dropped); e0 gets t2,t3 then t0,t1.
  np.testing.assert_array_equal(kept[1], [[True, False], [True, False], [True, False],
                                          [True, False]])


def test_dropped_assignment_contributes_zero():
  # Capacity 1, every token's first choice is expert 0: only token 0 keeps it.
  x = _x(1, 3, 4, seed=2)
  expert = [[[0, 1], [0, 1], [0, 1]]]
  weight = [[[0.5, 0.5], [0.75, 0.25], [0.9, 0.1]]]
  y, kept = capacity_dispatch(x, _routing(expert, weight, 2), 1,
                                       _scale_experts([1.0, 10.0]))
  np.testing.assert_array_equal(kept, [[[True, True], [False, False], [False, False]]])
  np.testing.assert_allclose(y[0, 0], (0.5 + 5.0) * np.asarray(x[0, 0]), rtol=1e-6)
  np.testing.assert_array_equal(y[0, 1:], np.zeros((2, 4), np.float32))


def test_capacity_one_expert_takes_all():
  # All tokens choose expert 1 first and expert 0 second: each expert keeps the first C
  # positions, so the last S-C tokens lose both choices.
  s, c = 5, 3
  expert = [[[1, 0]] * s]
  weight = [[[0.6, 0.4]] * s]
  slot = dispatch.capacity_positions(jnp.asarray(expert, jnp.int32), 2)
  np.testing.assert_array_equal(slot[0], [[t, t] for t in range(s)])
  x = _x(1, s, 2, seed=3)
  y, kept = capacity_dispatch(x, _routing(expert, weight, 2), c,
                                       _scale_experts(SCALE_E))
  np.testing.assert_array_equal(kept[0], [[t < c, t < c] for t in range(s)])
  factor_S = np.array([0.6 * 3 + 0.4 * 2] * c + [0.0] * (s - c), np.float32)
  np.testing.assert_allclose(y[0], factor_S[:, None] * np.asarray(x[0]), rtol=1e-6)


def test_dropless_sorted_rows_and_group_sizes():
  x = _x(1, 4, 3, seed=4)
  r = _routing([EXPERT_SxK], [WEIGHT_SxK], 3)

  @jax.jit
  def run(x):
    seen = {}

    def experts(rows_MxD, sizes_E):
      seen["rows"], seen["sizes"] = rows_MxD, sizes_E
      return rows_MxD * jnp.repeat(jnp.asarray([2.0, 3.0, 5.0]), sizes_E,
                                   total_repeat_length=rows_MxD.shape[0])[:, None]

    y, kept = dispatch.dropless_dispatch(x, r, _plan("dropless"),
                                         dispatch.Experts(None, _grouped(experts)))
    return y, kept, seen["rows"], seen["sizes"]

  y, kept, rows, sizes = run(x)
  np.testing.assert_array_equal(sizes, [4, 4, 0])
  # Stable sort of the token-major assignments: expert 0 gets t0,t1,t2,t3; expert 1 too.
  np.testing.assert_array_equal(rows, np.asarray(x[0])[[0, 1, 2, 3, 0, 1, 2, 3]])
  assert bool(jnp.all(kept))
  w = np.asarray(WEIGHT_SxK, np.float32)
  factor_S = np.array([w[0, 0] * 2 + w[0, 1] * 3, w[1, 0] * 2 + w[1, 1] * 3,
                       w[2, 0] * 2 + w[2, 1] * 3, w[3, 0] * 3 + w[3, 1] * 2])
  np.testing.assert_allclose(y[0], factor_S[:, None] * np.asarray(x[0]), rtol=1e-6)


@pytest.mark.parametrize("backend", ["ragged_dot", "tiled", "chunked", "blocked"])
def test_dropless_equals_capacity_without_drops(backend):
  g, s, d, e, k = 2, 6, 5, 4, 2
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(g, s, d)), jnp.float32)
  w_ExDxD = jnp.asarray(rng.normal(size=(e, d, d)), jnp.float32)
  # K distinct experts per token, drawn at random.
  index = np.stack([rng.permutation(e)[:k] for _ in range(g * s)]).reshape(g, s, k)
  weight = jax.nn.softmax(jnp.asarray(rng.normal(size=(g, s, k)), jnp.float32), axis=-1)
  r = _routing(index, weight, e)
  buffered = lambda buf: jnp.einsum("erd,edf->erf", jnp.tanh(buf), w_ExDxD)
  grouped = lambda rows, sizes: gmm.grouped_matmul(jnp.tanh(rows), w_ExDxD, sizes, backend)
  y_cap, kept_cap = capacity_dispatch(x, r, s * k, buffered)
  y_drop, kept_drop = dropless_dispatch(x, r, grouped)
  assert bool(jnp.all(kept_cap)) and bool(jnp.all(kept_drop))
  np.testing.assert_allclose(y_drop, y_cap, rtol=1e-5, atol=1e-5)
  # The smallest capacity that drops nothing is the largest per-group load.
  load = max(np.bincount(index[i].ravel(), minlength=e).max() for i in range(g))
  y_min, kept_min = capacity_dispatch(x, r, int(load), buffered)
  assert bool(jnp.all(kept_min))
  np.testing.assert_allclose(y_min, y_cap, rtol=1e-6, atol=1e-6)
  _, kept_less = capacity_dispatch(x, r, int(load) - 1, buffered)
  assert not bool(jnp.all(kept_less))


# Drop policies. The hand experts of three experts scale by 2, 3, 5.
HAND_SCALE_E = (2.0, 3.0, 5.0)
_hand_experts = _scale_experts(HAND_SCALE_E)  # one function: compiles once per shape
_positions = jax.jit(dispatch.capacity_positions, static_argnums=(1,), **JIT_OPTIONS)


def _hand_dispatch(expert, weight, capacity, policy, renormalize=False):
  """(y / x per token [G, S], kept [G, S, K]) for x = ones: the factor each token got."""
  r = _routing(expert, weight, 3)
  g, s, _ = r.expert_index_GxSxK.shape
  x = jnp.ones((g, s, 2), jnp.float32)
  y, kept = capacity_dispatch(x, r, capacity, _hand_experts, policy, renormalize)
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


# The gather path (few tokens: a decode step).


def test_plan_gathers_only_few_tokens_in_dropless_evaluation():
  cfg = MoEConfig(num_experts=8, top_k=2)
  assert dispatch.plan(cfg, False, 1, num_tokens=3).path == "gather"  # T*K = 6 < 8
  assert dispatch.plan(cfg, False, 1, num_tokens=4).path == "dropless"  # 8, not < 8
  assert dispatch.plan(cfg, False, 1).path == "dropless"  # T unknown
  assert dispatch.plan(cfg, True, 1, num_tokens=1).path == "capacity"  # training
  cf = dataclasses.replace(cfg, eval_capacity_factor=2.0)
  assert dispatch.plan(cf, False, 1, num_tokens=1).path == "capacity"  # drops asked for
  ec = dataclasses.replace(cfg, router="expert_choice", allow_noncausal_routing=True)
  assert dispatch.plan(ec, False, 1, num_tokens=1).path == "expert_choice"


@pytest.mark.parametrize("router", list(routing.ROUTERS))
@pytest.mark.parametrize("train,eval_cf,num_tokens", [(True, 0.0, None), (False, 0.0, 64),
                                                      (False, 0.0, 1), (False, 2.0, 1)])
def test_every_plan_path_declares_what_the_plan_sets(router, train, eval_cf, num_tokens):
  """A capacity-bound path gets a capacity and a factor, a dropless one neither; only a
  dropless path reports overflow; the records' capacity model applies except where the path
  says why not (expert choice)."""
  for training in dispatch.names(lambda p: p.training_choice):
    cfg = MoEConfig(num_experts=8, top_k=1 if router == "switch" else 2, router=router,
                    dispatch=training, eval_capacity_factor=eval_cf,
                    allow_noncausal_routing=True)
    plan = dispatch.plan(cfg, train, 16, num_tokens)
    path = dispatch.PATHS[plan.path]
    assert path.capacity_bound == (plan.capacity is not None), plan
    assert path.capacity_bound == (plan.capacity_factor is not None), plan
    assert not (path.capacity_bound and path.overflow), plan
    assert (path.no_capacity_model is None) == (routing.ROUTERS[router].path is None), plan


def test_moe_dispatch_names_only_the_training_paths():
  from moex import config as config_lib  # pylint: disable=g-import-not-at-top
  from experiments import tiny  # pylint: disable=g-import-not-at-top
  assert dispatch.names(lambda p: p.training_choice) == ("capacity", "dropless")
  c = tiny.get_config()
  c.moe.dispatch = "gather"  # chosen by plan() from a call's shape, never by the config
  with pytest.raises(config_lib.ConfigError,
                     match=r"^moe\.dispatch: unknown value 'gather' \(known: capacity, "
                           r"dropless\)$"):
    config_lib.validate(c, vocab_size=259)


def _expert_weights(e, d, f, seed=0):
  rng = np.random.default_rng(seed)
  w = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[1]), jnp.float32)
  return experts_lib.ExpertWeights(w(e, d, f), w(e, d, f), w(e, f, d))


@pytest.mark.parametrize("chunk_bytes", [experts_lib.GATHER_CHUNK_BYTES, 3 * 20 * 4])
def test_gather_equals_dropless_and_never_touches_other_experts(chunk_bytes, monkeypatch):
  """Three tokens, K=2 of E=8: the gather path gives the grouped matmul's output; with NaN
  in every unchosen expert's weights it still does (a path that multiplied all experts and
  masked the result would turn NaN). A small chunk splits each weight into row chunks."""
  monkeypatch.setattr(experts_lib, "GATHER_CHUNK_BYTES", chunk_bytes)
  g, s, d, f, e = 1, 3, 12, 20, 8
  x = _x(g, s, d, seed=3)
  index = [[[1, 6], [6, 2], [1, 4]]]
  weight = [[[0.7, 0.3], [0.5, 0.5], [0.9, 0.1]]]
  r = _routing(index, weight, e)
  w = _expert_weights(e, d, f)
  grouped = lambda rows, sizes: (experts_lib.grouped(w, rows, sizes, "chunked"),
                                 jnp.ones(rows.shape[:1], bool))
  want, _ = dispatch.dropless_dispatch(x, r, _plan("dropless"), dispatch.Experts(None, grouped))
  unused = np.setdiff1d(np.arange(e), np.ravel(index))
  poisoned = experts_lib.ExpertWeights(*(a.at[unused].set(jnp.nan) for a in w[:3]))
  gathered = lambda rows, ids: (experts_lib.gathered(poisoned, rows, ids),
                                jnp.ones(rows.shape[:1], bool))
  got, kept = jax.jit(lambda x: dispatch.gather_dispatch(
      x, r, _plan("gather"), dispatch.Experts(None, None, gathered)))(x)
  assert bool(jnp.all(kept))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert experts_lib._chunk_rows(d, f * 4) == (d if chunk_bytes > d * f * 4 else 3)


# Padding of packed rows: the hand sequence above with a padding token (t1) in it.
VALID_S = [True, False, True, True]


def test_padding_takes_no_capacity_slot():
  """Slots are counted over real tokens only: with t1 padding, t2's first choice takes the
  slot t1 had, and padding's assignments get NO_SLOT."""
  slot = np.asarray(dispatch.capacity_positions(jnp.asarray([EXPERT_SxK], jnp.int32), 2,
                                                valid_GxS=jnp.asarray([VALID_S])))
  real = np.asarray(VALID_S)
  compact = dispatch.capacity_positions(
      jnp.asarray([[e for e, v in zip(EXPERT_SxK, VALID_S) if v]], jnp.int32), 2)
  np.testing.assert_array_equal(slot[0][real], np.asarray(compact)[0])
  assert (slot[0][~real] == dispatch.NO_SLOT).all()
  for policy in ("position", "probability"):
    r = _routing([EXPERT_SxK], [WEIGHT_SxK], 2)._replace(valid_GxS=jnp.asarray([VALID_S]))
    y, kept = capacity_dispatch(_x(1, 4, 3), r, 2, _scale_experts(SCALE_E), policy)
    assert not np.asarray(kept)[0, 1].any()  # padding is never kept
    np.testing.assert_array_equal(y[0, 1], np.zeros(3, np.float32))  # nor gets output


def test_dropless_leaves_padding_out_of_the_groups():
  """The grouped matmul sees group sizes that add up to the real rows only (padding sorts
  last, in no group), and padding gets no routed output."""
  x = _x(1, 4, 3)
  r = _routing([EXPERT_SxK], [WEIGHT_SxK], 2)._replace(valid_GxS=jnp.asarray([VALID_S]))

  @jax.jit
  def run(x):
    seen = {}

    def grouped(rows_MxD, sizes_E):
      seen["sizes"] = sizes_E
      return rows_MxD * jnp.repeat(jnp.asarray(SCALE_E), sizes_E, total_repeat_length=8)[
          :, None] * (jnp.arange(8) < jnp.sum(sizes_E))[:, None]

    y, _ = dispatch.dropless_dispatch(x, r, _plan("dropless"),
                                      dispatch.Experts(None, _grouped(grouped)))
    return y, seen["sizes"]

  y, sizes = run(x)
  np.testing.assert_array_equal(sizes, [3, 3])  # 3 real tokens x K=2, one per expert each
  np.testing.assert_array_equal(y[0, 1], np.zeros(3, np.float32))
  full, _ = dropless_dispatch(x, _routing([EXPERT_SxK], [WEIGHT_SxK], 2),
                              lambda rows, sizes: rows * jnp.repeat(
                                  jnp.asarray(SCALE_E), sizes, total_repeat_length=8)[:, None])
  real = np.asarray(VALID_S)
  np.testing.assert_allclose(y[0][real], np.asarray(full)[0][real], rtol=1e-6)
