"""The jitted train and eval steps.

The train step also adds its metrics and MoE statistics to a window accumulator that stays
on device; the loop copies it to the host only at log steps and then resets it.

A batch is a dict of [B, L+1] int32 arrays (the data/model contract, WORKSPACE.md "Document
masks"): "tokens", and for packed rows "segment_ids" (0 = padding) and "positions". A bare
array is the tokens alone. With segment ids the loss is the mean cross-entropy over the
target weights w[b, i] = (seg[b, i] != 0) & (seg[b, i + 1] == seg[b, i]); without them
over every target, exactly as before.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moex.config import Config, DataConfig
from moex.model import lora
from moex.moe import stats as moe_stats

# The keys a batch may carry (tokens always; segment_ids and positions together).
BATCH_KEYS = ("tokens", "segment_ids", "positions")


def _reduce_layers(x_N: jax.Array, how: str) -> jax.Array:
  return jnp.sum(x_N) if how == "sum" else jnp.mean(x_N)


def as_batch(batch) -> dict:
  """The batch dict (a bare [B, L+1] array is {"tokens": it})."""
  if isinstance(batch, dict):
    return batch
  return {"tokens": batch}


def target_weights(segment_ids_BxL1: jax.Array) -> jax.Array:
  """w [B, L] float32: 1 where the target is the next token of the same document piece
  (a document's closing EOS is a target; the next document's first token is not)."""
  seg_BxL, next_BxL = segment_ids_BxL1[:, :-1], segment_ids_BxL1[:, 1:]
  return ((seg_BxL != 0) & (next_BxL == seg_BxL)).astype(jnp.float32)


def model_kwargs(batch: dict, data: DataConfig | None) -> dict:
  """The decoder's packed-row arguments for a batch (none without segment_ids):
  data.document_mask and data.document_positions switch the mask and the positions."""
  if "segment_ids" not in batch:
    return {}
  document_mask = True if data is None else data.document_mask
  document_positions = True if data is None else data.document_positions
  return {"segment_ids_BxL": batch["segment_ids"][:, :-1],
          "positions_BxL": batch["positions"][:, :-1] if document_positions else None,
          "document_mask": document_mask}


def forward(graphdef, params, buffers, batch, *, train: bool, rng: jax.Array | None = None,
            data: DataConfig | None = None):
  """(logits for tokens[:, :-1], targets tokens[:, 1:], target weights [B, L] or None
  (every target counts), MoE stats stacked over MoE layers ({} for a dense model), new
  buffers). `batch` is a batch dict or a tokens array; `data` holds the packing flags
  (None: both on).

  The model may update its buffers in training (the aux-loss-free router bias does).
  """
  batch = as_batch(batch)
  tokens_BxL1 = batch["tokens"]
  model = nnx.merge(graphdef, params, buffers)
  logits_BxLxV, moe = model(tokens_BxL1[:, :-1], train=train, rng=rng,
                            **model_kwargs(batch, data))
  new_buffers = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
  weight_BxL = target_weights(batch["segment_ids"]) if "segment_ids" in batch else None
  return (logits_BxLxV, tokens_BxL1[:, 1:], weight_BxL, {} if moe is None else moe.stats,
          new_buffers)


def num_targets(batch) -> jax.Array:
  """Targets that count in the loss (int32): w summed, or B * L without segment ids."""
  batch = as_batch(batch)
  if "segment_ids" not in batch:
    b, l1 = batch["tokens"].shape
    return jnp.asarray(b * (l1 - 1), jnp.int32)
  return jnp.sum(target_weights(batch["segment_ids"])).astype(jnp.int32)


def balancing_terms(moe: dict, how: str) -> dict:
  """Per-layer balancing terms combined over MoE layers ("mean" or "sum")."""
  names = ("load_balance_loss", "seq_load_balance_loss", "z_loss")
  if not moe:
    return {n: jnp.zeros((), jnp.float32) for n in names}
  return {n: _reduce_layers(moe[n], how) for n in names}


def loss_fn(params, buffers, batch, rng, *, graphdef, cfg: Config,
            denominator: jax.Array | None = None):
  """Mean cross-entropy plus the weighted balancing terms; returns (loss, aux).

  With target weights the cross-entropy is sum(w * ce) / `denominator` (None: sum(w));
  gradient accumulation passes the whole batch's sum(w) / micro-batches, so the mean over
  micro-batches is the whole batch's weighted mean.
  """
  logits_BxLxV, targets_BxL, weight_BxL, moe, new_buffers = forward(
      graphdef, params, buffers, batch, train=True, rng=rng, data=cfg.data)
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
  if weight_BxL is None:
    ce = jnp.mean(ce_BxL)
  else:
    if denominator is None:
      denominator = jnp.maximum(jnp.sum(weight_BxL), 1.0)
    ce = jnp.sum(ce_BxL * weight_BxL) / denominator
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
  """Returns (core, step): core(state, batch) -> (state, one step's metrics);
  step(state, acc, batch) -> (state, acc + metrics). Both pure, for jax.jit; `batch` is a
  batch dict (or a tokens array), its keys fixed per compilation.

  Gradients are taken with respect to the trainable parameters only (lora.partition): with
  adapters the frozen base weights enter as constants, so no gradient of theirs is computed.
  """
  def grad_fn(params, *args):
    trainable, frozen = lora.partition(params, cfg.lora)
    return jax.value_and_grad(
        lambda t, b, x, r, n=None: loss_fn(lora.join(t, frozen), b, x, r, graphdef=graphdef,
                                           cfg=cfg, denominator=n),
        has_aux=True)(trainable, *args)

  accum = cfg.train.grad_accum_steps

  def accumulated_grads(params, buffers, batch, rng):
    """Mean loss and gradients over `accum` equal micro-batches (a scan: one compiled
    micro-step). Buffers (the router bias) update micro-batch by micro-batch; MoE counts
    add up; the balancing terms are those of each micro-batch, averaged; the weighted
    cross-entropy divides by the whole batch's target count."""
    if accum == 1:
      return grad_fn(params, buffers, batch, rng)
    b = batch["tokens"].shape[0]
    micro_U = jax.tree.map(lambda x: x.reshape(accum, b // accum, -1), batch)
    denominator = None
    if "segment_ids" in batch:
      denominator = jnp.maximum(num_targets(batch).astype(jnp.float32), 1.0) / accum

    def body(carry, xs):
      buffers, sums = carry
      micro, i = xs
      (loss, aux), grads = grad_fn(params, buffers, micro, jax.random.fold_in(rng, i),
                                   denominator)
      new = {"loss": loss, "grads": grads, **{k: aux[k] for k in _MEAN_AUX}}
      sums = new if sums is None else jax.tree.map(jnp.add, sums, new)
      return (aux["buffers"], sums), aux["moe"]

    first = body((buffers, None), (jax.tree.map(lambda x: x[0], micro_U), 0))
    (buffers, sums), moe_U = jax.lax.scan(
        body, first[0], (jax.tree.map(lambda x: x[1:], micro_U), jnp.arange(1, accum)))
    sums = jax.tree.map(lambda x: x / accum, sums)
    moe = moe_stats.accumulate(first[1], _fold(moe_U)) if first[1] else {}
    aux = {**{k: sums[k] for k in _MEAN_AUX}, "moe": moe, "buffers": buffers}
    return (sums["loss"], aux), sums["grads"]

  def core(state: dict, batch):
    batch = as_batch(batch)
    rng = jax.random.fold_in(state["rng"], state["step"])
    (loss, aux), grads = accumulated_grads(state["params"], state["buffers"], batch, rng)
    trainable, frozen = lora.partition(state["params"], cfg.lora)
    updates, opt_state = tx.update(grads, state["opt_state"], trainable)
    params = lora.join(optax.apply_updates(trainable, updates), frozen)
    grad_norm = optax.tree.norm(grads)
    new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state,
                     buffers=aux["buffers"])
    scalars = {"loss": loss, "cross_entropy": aux["cross_entropy"],
               "load_balance_loss": aux["load_balance_loss"],
               "seq_load_balance_loss": aux["seq_load_balance_loss"], "z_loss": aux["z_loss"],
               "grad_norm": grad_norm,
               # A finite loss can come with NaN gradients (and then NaN parameters).
               "nonfinite": (~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))).astype(jnp.int32),
               # Loss targets (real tokens): what tokens_per_sec and MFU count.
               "targets": num_targets(batch),
               "steps": jnp.ones((), jnp.int32)}
    return new_state, {"scalars": scalars, "moe": aux["moe"]}

  def step(state: dict, acc: dict, batch):
    new_state, new = core(state, batch)
    return new_state, accumulate(acc, new)

  return core, step


def make_eval_step(cfg: Config, graphdef, token_bytes: np.ndarray) -> tuple[Callable,
                                                                            Callable]:
  """Returns (core, step) like make_train_step; step(params, buffers, acc, batch) -> acc
  with summed cross-entropy, target tokens, target bytes and MoE statistics (weighted
  targets only when the batch carries segment ids)."""
  token_bytes_V = jnp.asarray(token_bytes, jnp.int32)

  def core(params, buffers, batch):
    logits_BxLxV, targets_BxL, weight_BxL, moe, _ = forward(graphdef, params, buffers, batch,
                                                            train=False, data=cfg.data)
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL)
    bytes_BxL = token_bytes_V[targets_BxL]
    if weight_BxL is None:
      scalars = {"ce_sum": jnp.sum(ce_BxL), "tokens": jnp.asarray(ce_BxL.size, jnp.float32),
                 "bytes": jnp.sum(bytes_BxL).astype(jnp.float32)}
    else:
      scalars = {"ce_sum": jnp.sum(ce_BxL * weight_BxL), "tokens": jnp.sum(weight_BxL),
                 "bytes": jnp.sum(bytes_BxL * weight_BxL)}
    return {"scalars": scalars, "moe": moe}

  def step(params, buffers, acc: dict, batch):
    return accumulate(acc, core(params, buffers, batch))

  return core, step


def make_probe_step(graphdef, data: DataConfig | None = None) -> Callable:
  """probe(params, buffers, batch) -> first-choice expert [num_moe_layers, B, L] of every
  token under evaluation routing, -1 on padding (the routing_churn probe; [0, B, L] for a
  dense model)."""

  def probe(params, buffers, batch) -> jax.Array:
    batch = as_batch(batch)
    tokens_BxL1 = batch["tokens"]
    model = nnx.merge(graphdef, params, buffers)
    _, moe = model(tokens_BxL1[:, :-1], train=False, **model_kwargs(batch, data))
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
