"""The jitted train and eval steps.

The train step also adds its metrics and MoE statistics to a window accumulator that stays
on device; the loop copies it to the host only at log steps and then resets it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moex.config import Config
from moex.moe import stats as moe_stats


def _reduce_layers(x_N: jax.Array, how: str) -> jax.Array:
  return jnp.sum(x_N) if how == "sum" else jnp.mean(x_N)


def forward(graphdef, params, buffers, tokens_BxL1: jax.Array, *, train: bool,
            rng: jax.Array | None = None):
  """(logits for tokens[:, :-1], targets tokens[:, 1:], MoE stats stacked over MoE layers
  ({} for a dense model), new buffers).

  The model may update its buffers in training (the aux-loss-free router bias does).
  """
  model = nnx.merge(graphdef, params, buffers)
  logits_BxLxV, moe = model(tokens_BxL1[:, :-1], train=train, rng=rng)
  new_buffers = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
  return logits_BxLxV, tokens_BxL1[:, 1:], {} if moe is None else moe.stats, new_buffers


def balancing_terms(moe: dict, how: str) -> dict:
  """Per-layer balancing terms combined over MoE layers ("mean" or "sum")."""
  names = ("load_balance_loss", "seq_load_balance_loss", "z_loss")
  if not moe:
    return {n: jnp.zeros((), jnp.float32) for n in names}
  return {n: _reduce_layers(moe[n], how) for n in names}


def loss_fn(params, buffers, tokens_BxL1, rng, *, graphdef, cfg: Config):
  """Mean cross-entropy plus the weighted balancing terms; returns (loss, aux)."""
  logits_BxLxV, targets_BxL, moe, new_buffers = forward(graphdef, params, buffers, tokens_BxL1,
                                                        train=True, rng=rng)
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL))
  terms = balancing_terms(moe, cfg.moe.aux_reduce)
  m = cfg.moe
  loss = (ce + m.load_balance_weight * terms["load_balance_loss"]
          + m.seq_load_balance_weight * terms["seq_load_balance_loss"]
          + m.z_loss_weight * terms["z_loss"])
  return loss, {"cross_entropy": ce, **terms, "moe": moe, "buffers": new_buffers}


_MEAN_AUX = ("cross_entropy", "load_balance_loss", "seq_load_balance_loss", "z_loss")


def _fold(moe_U: dict) -> dict:
  """Stacked per-micro-batch MoE stats [U-1, ...] combined into one window."""
  return {k: (jnp.max(v, axis=0) if k in moe_stats.MAX_FIELDS else jnp.sum(v, axis=0))
          for k, v in moe_U.items()}


def accumulate(acc: dict, new: dict) -> dict:
  """Adds one step's {"scalars", "moe"} into the window accumulator."""
  out = {"scalars": jax.tree.map(jnp.add, acc["scalars"], new["scalars"])}
  out["moe"] = moe_stats.accumulate(acc["moe"], new["moe"]) if new["moe"] else {}
  return out


def zeros_like_tree(shapes: Any) -> Any:
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def make_train_step(cfg: Config, graphdef, tx: optax.GradientTransformation) -> tuple[
    Callable, Callable]:
  """Returns (core, step): core(state, tokens) -> (state, one step's metrics);
  step(state, acc, tokens) -> (state, acc + metrics). Both pure, for jax.jit."""
  grad_fn = jax.value_and_grad(
      lambda p, b, t, r: loss_fn(p, b, t, r, graphdef=graphdef, cfg=cfg), has_aux=True)

  accum = cfg.train.grad_accum_steps

  def accumulated_grads(params, buffers, tokens_BxL1, rng):
    """Mean loss and gradients over `accum` equal micro-batches (a scan: one compiled
    micro-step). Buffers (the router bias) update micro-batch by micro-batch; MoE counts
    add up; the balancing terms are those of each micro-batch, averaged."""
    if accum == 1:
      return grad_fn(params, buffers, tokens_BxL1, rng)
    b = tokens_BxL1.shape[0]
    micro_UxBxL1 = tokens_BxL1.reshape(accum, b // accum, -1)

    def body(carry, xs):
      buffers, sums = carry
      tokens, i = xs
      (loss, aux), grads = grad_fn(params, buffers, tokens, jax.random.fold_in(rng, i))
      new = {"loss": loss, "grads": grads, **{k: aux[k] for k in _MEAN_AUX}}
      sums = new if sums is None else jax.tree.map(jnp.add, sums, new)
      return (aux["buffers"], sums), aux["moe"]

    first = body((buffers, None), (micro_UxBxL1[0], 0))
    (buffers, sums), moe_U = jax.lax.scan(
        body, first[0], (micro_UxBxL1[1:], jnp.arange(1, accum)))
    sums = jax.tree.map(lambda x: x / accum, sums)
    moe = moe_stats.accumulate(first[1], _fold(moe_U)) if first[1] else {}
    aux = {**{k: sums[k] for k in _MEAN_AUX}, "moe": moe, "buffers": buffers}
    return (sums["loss"], aux), sums["grads"]

  def core(state: dict, tokens_BxL1: jax.Array):
    rng = jax.random.fold_in(state["rng"], state["step"])
    (loss, aux), grads = accumulated_grads(state["params"], state["buffers"], tokens_BxL1,
                                           rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    grad_norm = optax.tree.norm(grads)
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state,
                     buffers=aux["buffers"])
    scalars = {"loss": loss, "cross_entropy": aux["cross_entropy"],
               "load_balance_loss": aux["load_balance_loss"],
               "seq_load_balance_loss": aux["seq_load_balance_loss"], "z_loss": aux["z_loss"],
               "grad_norm": grad_norm,
               # A finite loss can come with NaN gradients (and then NaN parameters).
               "nonfinite": (~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))).astype(jnp.int32),
               "steps": jnp.ones((), jnp.int32)}
    return new_state, {"scalars": scalars, "moe": aux["moe"]}

  def step(state: dict, acc: dict, tokens_BxL1: jax.Array):
    new_state, new = core(state, tokens_BxL1)
    return new_state, accumulate(acc, new)

  return core, step


def make_eval_step(cfg: Config, graphdef, token_bytes: np.ndarray) -> tuple[Callable,
                                                                            Callable]:
  """Returns (core, step) like make_train_step; step(params, buffers, acc, tokens) -> acc
  with summed cross-entropy, target tokens, target bytes and MoE statistics."""
  del cfg
  token_bytes_V = jnp.asarray(token_bytes, jnp.int32)

  def core(params, buffers, tokens_BxL1: jax.Array):
    logits_BxLxV, targets_BxL, moe, _ = forward(graphdef, params, buffers, tokens_BxL1,
                                                train=False)
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
    scalars = {"ce_sum": jnp.sum(ce_BxL), "tokens": jnp.asarray(ce_BxL.size, jnp.float32),
               "bytes": jnp.sum(token_bytes_V[targets_BxL]).astype(jnp.float32)}
    return {"scalars": scalars, "moe": moe}

  def step(params, buffers, acc: dict, tokens_BxL1: jax.Array):
    return accumulate(acc, core(params, buffers, tokens_BxL1))

  return core, step


def make_probe_step(graphdef) -> Callable:
  """probe(params, buffers, tokens [B, L+1]) -> first-choice expert [num_moe_layers, B, L]
  of every token under evaluation routing (the routing_churn probe; [0, B, L] for a dense
  model)."""

  def probe(params, buffers, tokens_BxL1: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, params, buffers)
    _, moe = model(tokens_BxL1[:, :-1], train=False)
    if moe is None:
      return jnp.zeros((0,) + tokens_BxL1[:, :-1].shape, jnp.int32)
    return moe.first_choice_GxS

  return probe


def train_summary(acc: dict) -> dict:
  """Window means of the train scalars (host floats)."""
  s = {k: np.asarray(v) for k, v in acc["scalars"].items()}
  n = max(int(s["steps"]), 1)
  out = {k: float(s[k]) / n for k in ("loss", "cross_entropy", "load_balance_loss",
                                        "seq_load_balance_loss", "z_loss", "grad_norm")}
  out["nonfinite"] = int(s["nonfinite"])
  return out


def eval_summary(acc: dict) -> dict:
  s = {k: float(np.asarray(v)) for k, v in acc["scalars"].items()}
  loss = s["ce_sum"] / max(s["tokens"], 1.0)
  bpb = s["ce_sum"] / math.log(2) / max(s["bytes"], 1.0)
  return {"loss": loss, "bits_per_byte": bpb}
