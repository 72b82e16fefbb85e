"""Tests for moex/moe/layer.py: the MoE block against the slow reference in moe_reference.py."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from moe_reference import reference_moe

from experiments import tiny
from moex import config
from moex.moe.layer import MoEBlock

nnx.use_eager_sharding(False)


D, F = 16, 32
TOL = dict(rtol=1e-5, atol=1e-5)
_BASE = config.validate(tiny.get_config(), vocab_size=259)


def _cfgs(**moe_overrides) -> tuple[config.ModelConfig, config.MoEConfig]:
  """The tiny config shrunk to D=16, F=32, E=4, K=2, min_capacity=0, then overridden."""
  model = dataclasses.replace(_BASE.model, d_model=D)
  moe = dataclasses.replace(_BASE.moe, num_experts=4, top_k=2, d_expert=F, min_capacity=0)
  return model, dataclasses.replace(moe, **moe_overrides)


def _weights(e: int, seed: int):
  """O(1) router logits and expert outputs, so 1e-5 is a tight tolerance."""
  rng = np.random.default_rng(seed)
  arr = lambda *shape, scale: jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)
  return (arr(D, e, scale=1.0), arr(e, D, F, scale=D**-0.5), arr(e, D, F, scale=D**-0.5),
          arr(e, F, D, scale=F**-0.5))


def _x(b: int, l: int, seed: int = 100) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, l, D)), jnp.float32)


def _block(moe_cfg: config.MoEConfig, weights) -> MoEBlock:
  """The block with `weights` (abstract init: eager random init compiles per shape)."""
  model_cfg = _cfgs()[0]
  abstract = nnx.eval_shape(lambda: MoEBlock(model_cfg, moe_cfg, nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  wr, wg, wu, wd = weights
  nnx.replace_by_pure_dict(state, {"router": {"kernel_DxE": wr},
                                   "experts": {"gate_ExDxF": wg, "up_ExDxF": wu,
                                               "down_ExFxD": wd}})
  block = nnx.merge(graphdef, state)
  np.testing.assert_array_equal(block.experts.down_ExFxD[...], wd)
  return block


def _block_apply(graphdef, state, x, train):
  return nnx.merge(graphdef, state)(x, train=train)


def _block_loss(graphdef, state, x, ct, train):
  y, s = _block_apply(graphdef, state, x, train)
  return jnp.sum(y * ct), (y, s)


# Module-level jits (graphdef, train, top_k, capacity static): equal configs and shapes
# compile once for the whole file.
_block_forward = jax.jit(_block_apply, static_argnums=(0, 3))
_block_grad = jax.jit(jax.grad(_block_loss, argnums=(1, 2), has_aux=True),
                      static_argnums=(0, 4))
_reference_forward = jax.jit(reference_moe, static_argnames=("top_k", "capacity"))


def _reference_loss(x, wr, wg, wu, wd, ct, top_k, capacity):
  y, kept = reference_moe(x, wr, wg, wu, wd, top_k=top_k, capacity=capacity)
  return jnp.sum(y * ct), (y, kept)


_reference_grad = jax.jit(jax.grad(_reference_loss, argnums=range(5), has_aux=True),
                          static_argnames=("top_k", "capacity"))


def _run(block: MoEBlock, x: jax.Array, train: bool, ct: jax.Array | None = None):
  """(y, stats) and, with a cotangent, grads of sum(y * ct) w.r.t. (x, wr, wg, wu, wd)."""
  graphdef, state = nnx.split(block)
  if ct is None:
    y, s = _block_forward(graphdef, state, x, train)
    return y, s, None
  (g_state, g_x), (y, s) = _block_grad(graphdef, state, x, ct, train)
  grads = (g_x, g_state["router"]["kernel_DxE"][...], g_state["experts"]["gate_ExDxF"][...],
           g_state["experts"]["up_ExDxF"][...], g_state["experts"]["down_ExFxD"][...])
  return y, s, grads


def _reference(x, weights, top_k, capacity, ct=None):
  """Reference (y, kept) and, with a cotangent, its grads w.r.t. (x, wr, wg, wu, wd)."""
  if ct is None:
    y, kept = _reference_forward(x, *weights, top_k=top_k, capacity=capacity)
    return y, kept, None
  grads, (y, kept) = _reference_grad(x, *weights, ct, top_k=top_k, capacity=capacity)
  return y, kept, grads


def _assert_close(got, want):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)


def _assert_grads_close(got, want):
  for name, g, w in zip(("x", "router", "gate", "up", "down"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), **TOL, err_msg=f"d/d{name}")


def _reference_counts(weights, x, top_k, kept):
  """Per-expert (load, kept) counted from the reference's choices."""
  e = weights[0].shape[1]
  logits = np.einsum("bld,de->ble", np.asarray(x, np.float64), np.asarray(weights[0]))
  choice = np.argsort(-logits, axis=-1, kind="stable")[..., :top_k]
  load = np.bincount(choice.ravel(), minlength=e)
  kept_e = np.bincount(choice[np.asarray(kept)].ravel(), minlength=e)
  return load, kept_e


def _check_stats(s, *, b, l, e, k, capacity, dropless):
  load, kept = np.asarray(s["expert_load"]), np.asarray(s["expert_kept"])
  assert load.shape == kept.shape == (e,)
  assert load.sum() == b * l * k
  assert np.all(kept <= load)
  if capacity is not None:
    assert np.all(kept <= capacity * b)
  if dropless:
    np.testing.assert_array_equal(kept, load)
  entropy = float(s["entropy_sum"]) / (b * l)
  assert -1e-6 <= entropy <= math.log(e) + 1e-6
  assert int(s["max_group_load"]) <= l  # top-k picks distinct experts
  assert int(s["steps"]) == 1


# (dispatch, grouped_matmul): every path with nothing dropped (capacity_factor = E).
# ("dropless", "auto") is one of the two backends; which one depends on the platform.
NO_DROP_PATHS = [("capacity", "auto"), ("dropless", "ragged_dot"), ("dropless", "tiled"),
                 ("dropless", "chunked")]


@pytest.mark.parametrize("path,backend", NO_DROP_PATHS)
def test_no_drops_matches_reference_with_grads(path, backend):
  b, l, e, k = 2, 8, 4, 2
  moe = _cfgs(dispatch=path, grouped_matmul=backend, capacity_factor=float(e))[1]
  weights = _weights(e, seed=1)
  x = _x(b, l)
  ct = _x(b, l, seed=7)
  y, s, grads = _run(_block(moe, weights), x, train=True, ct=ct)
  y_ref, kept_ref, grads_ref = _reference(x, weights, k, None, ct)
  assert y.shape == (b, l, D) and y.dtype == jnp.float32
  _assert_close(y, y_ref)
  _assert_grads_close(grads, grads_ref)
  assert bool(jnp.all(kept_ref))
  _check_stats(s, b=b, l=l, e=e, k=k, capacity=None, dropless=True)
  load, _ = _reference_counts(weights, x, k, kept_ref)
  np.testing.assert_array_equal(s["expert_load"], load)


@pytest.mark.parametrize("path", ["capacity", "dropless"])
def test_fewer_tokens_than_slots(path):
  # B=1, L=3 tokens, E=8, K=2: 6 assignments for 8 experts, some get nothing. With
  # capacity, C = ceil(1.0 * 3 * 2 / 8) = 1: each expert takes one assignment.
  b, l, e, k = 1, 3, 8, 2
  moe = _cfgs(num_experts=e, top_k=k, dispatch=path, capacity_factor=1.0,
              grouped_matmul="tiled")[1]
  capacity = moe.capacity(l, moe.capacity_factor) if path == "capacity" else None
  assert capacity in (1, None)
  weights = _weights(e, seed=3)
  x = _x(b, l, seed=3)
  y, s, _ = _run(_block(moe, weights), x, train=True)
  y_ref, kept_ref, _ = _reference(x, weights, k, capacity)
  _assert_close(y, y_ref)
  load, kept = _reference_counts(weights, x, k, kept_ref)
  np.testing.assert_array_equal(s["expert_load"], load)
  np.testing.assert_array_equal(s["expert_kept"], kept)
  assert int(np.sum(load == 0)) >= e - l * k
  _check_stats(s, b=b, l=l, e=e, k=k, capacity=capacity, dropless=capacity is None)


def _dominated_weights_and_x(b, l, e, favourite):
  """Router weights and tokens for which every token's first choice is `favourite`."""
  wr, wg, wu, wd = _weights(e, seed=4)
  wr = np.array(wr)
  wr[0] = 0.0
  wr[0, favourite] = 20.0
  x = np.array(_x(b, l, seed=4))
  x[..., 0] = np.abs(x[..., 0]) + 1.0  # feature 0 > 1: logit_fav > 20 + noise
  return (jnp.asarray(wr), wg, wu, wd), jnp.asarray(x)


@pytest.mark.parametrize("path", ["capacity", "dropless"])
def test_one_expert_takes_every_token(path):
  b, l, e, k, fav = 2, 8, 4, 2, 2
  moe = _cfgs(dispatch=path, capacity_factor=1.0, grouped_matmul="tiled")[1]
  c = moe.capacity(l, 1.0)
  assert c == 4
  weights, x = _dominated_weights_and_x(b, l, e, fav)
  ct = _x(b, l, seed=9) if path == "capacity" else None  # grads where drops happen
  y, s, grads = _run(_block(moe, weights), x, train=True, ct=ct)
  capacity = c if path == "capacity" else None
  y_ref, kept_ref, grads_ref = _reference(x, weights, k, capacity, ct)
  _assert_close(y, y_ref)
  if ct is not None:
    _assert_grads_close(grads, grads_ref)
  load = np.asarray(s["expert_load"])
  assert load[fav] == b * l  # every token's first choice
  if path == "capacity":
    # The favourite keeps the first C first choices of each sequence, drops the rest.
    np.testing.assert_array_equal(kept_ref[:, :, 0], np.broadcast_to(np.arange(l) < c, (b, l)))
    assert int(s["expert_kept"][fav]) == b * c
    _, kept = _reference_counts(weights, x, k, kept_ref)
    np.testing.assert_array_equal(s["expert_kept"], kept)
  _check_stats(s, b=b, l=l, e=e, k=k, capacity=capacity, dropless=path == "dropless")


def test_capacity_one():
  b, l, e, k = 2, 8, 4, 2
  moe = _cfgs(dispatch="capacity", capacity_factor=0.01, min_capacity=0)[1]
  assert moe.capacity(l, moe.capacity_factor) == 1
  weights = _weights(e, seed=5)
  x, ct = _x(b, l, seed=5), _x(b, l, seed=10)
  y, s, grads = _run(_block(moe, weights), x, train=True, ct=ct)
  y_ref, kept_ref, grads_ref = _reference(x, weights, k, 1, ct)
  _assert_close(y, y_ref)
  _assert_grads_close(grads, grads_ref)
  # At most one assignment per expert and sequence survives.
  assert int(np.sum(kept_ref)) <= b * e
  _, kept = _reference_counts(weights, x, k, kept_ref)
  np.testing.assert_array_equal(s["expert_kept"], kept)
  _check_stats(s, b=b, l=l, e=e, k=k, capacity=1, dropless=False)


@pytest.mark.parametrize("path,cf", [("capacity", 0.5), ("dropless", 1.0)])
def test_top_k_equals_num_experts(path, cf):
  # K = E: every token goes to every expert. With cf=0.5, C = 4 < L = 8 per expert, so the
  # choice-major priority decides who survives.
  b, l, e = 2, 8, 4
  moe = _cfgs(top_k=e, dispatch=path, capacity_factor=cf, grouped_matmul="tiled")[1]
  weights = _weights(e, seed=6)
  x = _x(b, l, seed=6)
  ct = _x(b, l, seed=11) if path == "capacity" else None  # grads where drops happen
  capacity = moe.capacity(l, cf) if path == "capacity" else None
  y, s, grads = _run(_block(moe, weights), x, train=True, ct=ct)
  y_ref, kept_ref, grads_ref = _reference(x, weights, e, capacity, ct)
  _assert_close(y, y_ref)
  if ct is not None:
    _assert_grads_close(grads, grads_ref)
  np.testing.assert_array_equal(s["expert_load"], [b * l] * e)
  expected_kept = b * min(l, capacity) if capacity else b * l
  np.testing.assert_array_equal(s["expert_kept"], [expected_kept] * e)
  if capacity is not None:
    assert capacity == 4 and not bool(jnp.all(kept_ref))
  _check_stats(s, b=b, l=l, e=e, k=e, capacity=capacity, dropless=capacity is None)


def test_train_capacity_eval_dropless():
  # Training drops (cf=0.5); eval_capacity_factor=0 makes evaluation dropless.
  b, l, e, k = 2, 8, 4, 2
  moe = _cfgs(dispatch="capacity", capacity_factor=0.5, eval_capacity_factor=0.0,
              grouped_matmul="tiled")[1]
  assert moe.capacity(l, 0.5) == 2
  weights = _weights(e, seed=7)
  block = _block(moe, weights)
  x = _x(b, l, seed=12)
  assert block.dispatch_mode(True) == ("capacity", 0.5)
  assert block.dispatch_mode(False) == ("dropless", None)
  y_train, s_train, _ = _run(block, x, train=True)
  y_eval, s_eval, _ = _run(block, x, train=False)
  y_ref_train, kept_ref, _ = _reference(x, weights, k, 2)
  y_ref_eval, _, _ = _reference(x, weights, k, None)
  _assert_close(y_train, y_ref_train)
  _assert_close(y_eval, y_ref_eval)
  assert not bool(jnp.all(kept_ref))
  assert not np.allclose(y_train, y_eval)
  _check_stats(s_train, b=b, l=l, e=e, k=k, capacity=2, dropless=False)
  _check_stats(s_eval, b=b, l=l, e=e, k=k, capacity=None, dropless=True)
  # Both report what the training capacity keeps on these tokens.
  np.testing.assert_array_equal(s_eval["train_capacity_kept"], s_train["expert_kept"])
  np.testing.assert_array_equal(s_eval["expert_load"], s_train["expert_load"])


def test_dropless_train_eval_capacity_factor():
  # eval_capacity_factor > 0: evaluation runs the capacity path with that factor, even
  # when training is dropless.
  b, l, e, k = 2, 8, 4, 2
  moe = _cfgs(dispatch="dropless", capacity_factor=4.0, eval_capacity_factor=0.25,
              grouped_matmul="tiled")[1]
  weights = _weights(e, seed=8)
  block = _block(moe, weights)
  x = _x(b, l, seed=13)
  assert block.dispatch_mode(False) == ("capacity", 0.25)
  c_eval = moe.capacity(l, 0.25)
  assert c_eval == 1
  y_eval, s_eval, _ = _run(block, x, train=False)
  y_ref, kept_ref, _ = _reference(x, weights, k, c_eval)
  _assert_close(y_eval, y_ref)
  _, kept = _reference_counts(weights, x, k, kept_ref)
  np.testing.assert_array_equal(s_eval["expert_kept"], kept)
  _check_stats(s_eval, b=b, l=l, e=e, k=k, capacity=c_eval, dropless=False)
  assert block.dispatch_mode(True) == ("dropless", None)
  y_train, s_train, _ = _run(block, x, train=True)
  _assert_close(y_train, _reference(x, weights, k, None)[0])
  np.testing.assert_array_equal(s_train["expert_kept"], s_train["expert_load"])


def test_stats_against_reference_and_formulas():
  b, l, e, k = 2, 8, 4, 2
  moe = _cfgs(dispatch="capacity", capacity_factor=1.0)[1]
  c = moe.capacity(l, 1.0)
  weights = _weights(e, seed=9)
  x = _x(b, l, seed=14)
  _, s, _ = _run(_block(moe, weights), x, train=True)
  _, kept_ref, _ = _reference(x, weights, k, c)
  load, kept = _reference_counts(weights, x, k, kept_ref)
  np.testing.assert_array_equal(s["expert_load"], load)
  np.testing.assert_array_equal(s["expert_kept"], kept)
  np.testing.assert_array_equal(s["train_capacity_kept"], kept)
  _check_stats(s, b=b, l=l, e=e, k=k, capacity=c, dropless=False)
  # Router entropy, z-loss and load-balance loss from their definitions.
  logits = np.einsum("bld,de->ble", np.asarray(x, np.float64), np.asarray(weights[0]))
  logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
  p = np.exp(logits - logz[..., None])
  np.testing.assert_allclose(float(s["entropy_sum"]), -np.sum(p * np.log(p)), rtol=1e-5)
  np.testing.assert_allclose(float(s["z_loss"]), np.mean(logz**2), rtol=1e-5)
  f_e = load / load.sum()
  np.testing.assert_allclose(float(s["load_balance_loss"]),
                             e * np.sum(f_e * p.reshape(-1, e).mean(0)), rtol=1e-5)
  # A capacity equal to the largest per-sequence load drops nothing.
  moe_needed = dataclasses.replace(moe, min_capacity=int(s["max_group_load"]))
  _, s_needed, _ = _run(_block(moe_needed, weights), x, train=True)
  np.testing.assert_array_equal(s_needed["expert_kept"], s_needed["expert_load"])
