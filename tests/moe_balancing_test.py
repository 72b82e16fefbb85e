"""Tests for moex/moe/balancing.py, the aux-loss-free router bias, and the routing config.

Loss values are checked by hand on tiny routings; the bias is checked by running the
block's training-mode forward in a functional loop, as the train step does.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from moe_reference import D, build_block, random_weights, random_x, run_block, small_cfgs

from experiments import tiny
from moex import config
from moex.moe import balancing, gmm, routing
from moex.train import step as train_step

nnx.use_eager_sharding(False)


def _routing(expert_GxSxK, probs_GxSxE, logits_GxSxE=None) -> routing.Routing:
  probs = jnp.asarray(probs_GxSxE, jnp.float32)
  logits = jnp.log(probs) if logits_GxSxE is None else jnp.asarray(logits_GxSxE, jnp.float32)
  index = jnp.asarray(expert_GxSxK, jnp.int32)
  return routing.Routing(index, jnp.ones(index.shape, jnp.float32), probs, logits)


@jax.jit
def _losses(expert_GxSxK, probs_GxSxE):
  """(load_balance_loss, sequence_load_balance_loss) of a routing, jitted: eager dispatch
  would compile every small op."""
  r = _routing(expert_GxSxK, probs_GxSxE)
  load_GxE = balancing.expert_counts(r.expert_index_GxSxK, r.probs_GxSxE.shape[-1])
  return (balancing.load_balance_loss(r, jnp.sum(load_GxE, 0)),
          balancing.sequence_load_balance_loss(r, load_GxE))


def _lb(expert, probs) -> float:
  return float(_losses(jnp.asarray(expert, jnp.int32), jnp.asarray(probs, jnp.float32))[0])


def _seq_lb(expert, probs) -> float:
  return float(_losses(jnp.asarray(expert, jnp.int32), jnp.asarray(probs, jnp.float32))[1])


def test_load_balance_loss_uniform_is_one():
  # 8 tokens, E=4, K=2: token t goes to experts t and t+1 (mod 4), every expert gets 4.
  e, t = 4, 8
  expert = [[[i % e, (i + 1) % e] for i in range(t)]]
  assert _lb(expert, np.full((1, t, e), 1 / e)) == pytest.approx(1.0, abs=1e-6)
  # With a uniform load, E * sum_e (1/E) P_e = sum_e P_e = 1 whatever the probabilities.
  probs = np.random.default_rng(0).dirichlet(np.ones(e), size=(1, t))
  assert _lb(expert, probs) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("e", [2, 4, 8])
def test_load_balance_loss_one_expert_is_e(e):
  # Every token to expert 0 with probability 1: f = P = one-hot, loss = E * 1 * 1.
  probs = np.zeros((2, 3, e))
  probs[..., 0] = 1.0
  assert _lb(np.zeros((2, 3, 1)), probs) == pytest.approx(e, abs=1e-5)
  # The fraction counts all K choices: with K=2 (second choice expert 1), f_0 = 1/2.
  expert = np.stack([np.zeros((2, 3)), np.ones((2, 3))], -1)
  assert _lb(expert, probs) == pytest.approx(e / 2, abs=1e-5)


def test_load_balance_loss_by_hand():
  # E=2, T=2, K=1: probs (0.7, 0.3) and (0.4, 0.6); P = (0.55, 0.45).
  probs = [[[0.7, 0.3], [0.4, 0.6]]]
  assert _lb([[[0], [1]]], probs) == pytest.approx(2 * (0.5 * 0.55 + 0.5 * 0.45), abs=1e-6)
  assert _lb([[[0], [0]]], probs) == pytest.approx(2 * 0.55, abs=1e-6)
  # E=3, T=2, K=2: choices (0, 1), (1, 2): f = (1, 2, 1) / 4; P = (0.3, 0.45, 0.25).
  probs = [[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]]
  expert = [[[0, 1], [1, 2]]]
  want = 3 * (0.25 * 0.3 + 0.5 * 0.45 + 0.25 * 0.25)
  assert _lb(expert, probs) == pytest.approx(want, abs=1e-6)
  # f is a constant (stop_gradient): d loss / d probs[t, e] = E * f_e / T.
  index = jnp.asarray(expert, jnp.int32)
  load_E = jnp.asarray([1, 2, 1])
  grad = jax.grad(lambda p: balancing.load_balance_loss(
      routing.Routing(index, jnp.ones((1, 2, 2)), p, p), load_E))(jnp.asarray(probs))
  np.testing.assert_allclose(grad[0], [[0.375, 0.75, 0.375]] * 2, rtol=1e-6)


def test_sequence_loss_sees_imbalance_inside_sequences():
  # Sequence 0 sends both tokens to expert 0 (probs 0.9 / 0.1), sequence 1 to expert 1
  # (0.1 / 0.9): the batch is balanced (f = P = 1/2 -> 1.0), each sequence is not
  # (f = (1, 0), P = (0.9, 0.1) -> 2 * 0.9 = 1.8).
  expert = [[[0], [0]], [[1], [1]]]
  probs = [[[0.9, 0.1], [0.9, 0.1]], [[0.1, 0.9], [0.1, 0.9]]]
  assert _lb(expert, probs) == pytest.approx(1.0, abs=1e-6)
  assert _seq_lb(expert, probs) == pytest.approx(1.8, abs=1e-6)
  # One sequence: both variants agree.
  assert _seq_lb(expert[:1], probs[:1]) == pytest.approx(_lb(expert[:1], probs[:1]), abs=1e-6)


def test_z_loss_by_hand():
  # logsumexp(0, 0) = ln 2, logsumexp(ln 3, 0) = ln 4: mean of squares = 2.5 (ln 2)^2.
  logits = jnp.asarray([[[0.0, 0.0], [math.log(3.0), 0.0]]])
  r = routing.Routing(jnp.zeros((1, 2, 1), jnp.int32), jnp.ones((1, 2, 1)),
                      jax.nn.softmax(logits), logits)
  assert float(balancing.z_loss(r)) == pytest.approx(2.5 * math.log(2) ** 2, rel=1e-6)
  # Gradient: 2 * lse * softmax / T.
  grad = jax.grad(lambda z: balancing.z_loss(r._replace(logits_GxSxE=z)))(logits)
  want = 2 * np.array([[math.log(2)], [math.log(4)]]) * np.array([[0.5, 0.5], [0.75, 0.25]]) / 2
  np.testing.assert_allclose(grad[0], want, rtol=1e-6)


def test_balancing_terms_reduce_over_layers():
  moe = {"load_balance_loss": jnp.asarray([1.0, 2.0, 3.0]),
         "seq_load_balance_loss": jnp.asarray([2.0, 2.0, 5.0]),
         "z_loss": jnp.asarray([0.5, 0.0, 1.0])}
  mean = train_step.balancing_terms(moe, "mean")
  total = train_step.balancing_terms(moe, "sum")
  assert float(mean["load_balance_loss"]) == pytest.approx(2.0)
  assert float(total["load_balance_loss"]) == pytest.approx(6.0)
  assert float(mean["seq_load_balance_loss"]) == pytest.approx(3.0)
  assert float(total["z_loss"]) == pytest.approx(1.5)


def test_block_balancing_stats_match_formulas():
  # One sequence balanced only in aggregate: the block's three terms against numpy.
  b, l, e, k = 2, 8, 4, 2
  moe = small_cfgs(dispatch="dropless", grouped_matmul="tiled")[1]
  w = random_weights(e, seed=40)
  x = random_x(b, l, seed=41)
  _, s, _ = run_block(build_block(moe, w), x, train=True)
  logits = np.einsum("bld,de->ble", np.asarray(x, np.float64), np.asarray(w["router"]))
  lse = np.log(np.sum(np.exp(logits), -1))
  p = np.exp(logits - lse[..., None])
  choice = np.argsort(-logits, -1, kind="stable")[..., :k]
  f_BxE = np.stack([np.bincount(choice[i].ravel(), minlength=e) for i in range(b)]) / (l * k)
  f_E = f_BxE.mean(0)
  np.testing.assert_allclose(float(s["load_balance_loss"]),
                             e * np.sum(f_E * p.reshape(-1, e).mean(0)), rtol=1e-5)
  np.testing.assert_allclose(float(s["seq_load_balance_loss"]),
                             np.mean(e * np.sum(f_BxE * p.mean(1), -1)), rtol=1e-5)
  np.testing.assert_allclose(float(s["z_loss"]), np.mean(lse**2), rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Aux-loss-free balancing: the sigmoid_bias router's bias.

E_BIAS, B_BIAS, L_BIAS = 4, 4, 16


def _skewed_block(rate: float):
  """sigmoid_bias, K=1, E=4, whose router adds 3 to expert 0's logit for every token
  (feature 0 is always 1): without the bias expert 0 takes nearly all tokens."""
  moe = small_cfgs(router="sigmoid_bias", top_k=1, num_experts=E_BIAS, dispatch="dropless",
                   grouped_matmul="tiled", bias_update_rate=rate)[1]
  w = random_weights(E_BIAS, seed=42)
  wr = np.array(w["router"]) * 0.3
  wr[0] = 0.0
  wr[0, 0] = 3.0
  return build_block(moe, dict(w, router=jnp.asarray(wr)))


def _tokens_x(i: int) -> jax.Array:
  x = np.array(random_x(B_BIAS, L_BIAS, seed=1000 + i))
  x[..., 0] = 1.0
  return jnp.asarray(x)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward(graphdef, params, buffers, x, train=True):
  """moex/train/step.py forward(): merge, run, read back the non-Param state."""
  model = nnx.merge(graphdef, params, buffers)
  _, out = model(x, train=train)
  return out.stats["expert_load"], nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))


def _split(block):
  graphdef, params, buffers = nnx.split(block, nnx.Param, ...)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)


def test_bias_balances_load_over_steps():
  graphdef, params, buffers = _split(_skewed_block(rate=0.02))
  assert "bias_E" not in params["router"]  # not trained
  np.testing.assert_array_equal(buffers["router"]["bias_E"], np.zeros(E_BIAS))
  ratios = []
  for i in range(40):
    load, buffers = _forward(graphdef, params, buffers, _tokens_x(i))
    load = np.asarray(load, np.float64)
    ratios.append(load.max() / load.mean())
  bias = np.asarray(buffers["router"]["bias_E"])
  assert ratios[0] > 3.0, ratios  # expert 0 first takes nearly every token
  assert np.mean(ratios[-10:]) < 1.6, ratios
  assert bias[0] < np.min(bias[1:]) - 0.2, bias  # the crowded expert is pushed down
  # Each step moves every bias by exactly +-rate (or 0): sign updates.
  steps = np.round(np.abs(bias) / 0.02, 4)
  np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)


def test_bias_update_rule_and_eval_leaves_bias_alone():
  new = routing.update_bias(jnp.zeros(4), jnp.asarray([10, 2, 2, 2]), 0.1)
  np.testing.assert_allclose(new, [-0.1, 0.1, 0.1, 0.1], rtol=1e-6)  # mean load 4
  np.testing.assert_allclose(routing.update_bias(new, jnp.asarray([4, 4, 4, 4]), 0.1), new)
  # Eval does not touch the bias; training moves every entry by +-rate.
  graphdef, params, buffers = _split(_skewed_block(rate=0.05))
  _, after_eval = _forward(graphdef, params, buffers, _tokens_x(0), False)
  np.testing.assert_array_equal(after_eval["router"]["bias_E"], np.zeros(E_BIAS))
  _, after_train = _forward(graphdef, params, buffers, _tokens_x(0), True)
  np.testing.assert_allclose(np.abs(after_train["router"]["bias_E"]), 0.05, rtol=1e-6)


def test_bias_gets_no_gradient_and_is_checkpointed():
  block = _skewed_block(rate=0.05)
  graphdef, params, buffers = nnx.split(block, nnx.Param, ...)

  x = _tokens_x(0)

  def loss(p):
    y, _ = nnx.merge(graphdef, p, buffers)(x, train=False)
    return jnp.sum(y**2)

  grads = nnx.to_pure_dict(jax.eval_shape(jax.grad(loss), params))
  assert set(grads["router"]) == {"kernel_DxE"}
  assert isinstance(block.router.bias_E, routing.RouterBias)
  assert not isinstance(block.router.bias_E, nnx.Param)
  # The train state (what the checkpoint saves) holds the bias under "buffers", one per
  # MoE layer, and the optimizer never sees it.
  from moex.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from moex.train import state as state_lib  # pylint: disable=g-import-not-at-top

  cd = tiny.get_config()
  cd.model.d_model, cd.model.num_layers, cd.model.d_ff = D, 2, 32
  cd.model.num_heads, cd.model.num_kv_heads, cd.model.head_dim = 2, 1, 8
  cd.moe.router, cd.moe.num_experts, cd.moe.d_expert = "sigmoid_bias", 4, 32
  cfg = config.validate(cd, vocab_size=259)
  cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, data=1))
  model, _ = state_lib.build(cfg, optax.adamw(1e-3), mesh_lib.make_mesh(
      cfg.mesh, jax.devices()[:1]))
  flat = {jax.tree_util.keystr(p): v for p, v in
          jax.tree_util.tree_leaves_with_path(model.abstract_state)}
  bias_paths = sorted(p for p in flat if "bias_E" in p)
  assert len(bias_paths) == len(cfg.model.moe_layers) == 2, bias_paths
  assert all(p.startswith("['buffers']") for p in bias_paths), bias_paths
  assert all(flat[p].shape == (4,) for p in bias_paths)


# ---------------------------------------------------------------------------------------
# Every grouped-matmul backend the config accepts runs (the config checks themselves are in
# tests/config_test.py).


def _validate(**moe):
  cd = tiny.get_config()
  for k, v in moe.items():
    cd.moe[k] = v
  return config.validate(cd, vocab_size=259)


def test_every_accepted_grouped_matmul_runs():
  x, w = jnp.ones((4, 2)), jnp.ones((2, 2, 3))
  for backend in config.GROUPED_MATMULS:
    _validate(dispatch="dropless", grouped_matmul=backend)
    out = jax.eval_shape(lambda a, b, backend=backend: gmm.grouped_matmul(
        a, b, jnp.asarray([2, 2]), backend), x, w)
    assert out.shape == (4, 3), backend
