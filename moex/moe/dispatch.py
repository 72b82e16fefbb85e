"""Dispatch: move token rows to expert buffers, run the experts, combine the results.

Every path is a `Path` entry of PATHS: its function, with one signature,

  path(x [G, S, D], routing, plan, experts) -> (output [G, S, D], kept [G, S, K]),

and what the statistics, the report, footprint and config ask of it (capacity-bound or
dropless, what its not-kept assignments are, whether moe.dispatch may name it, whether the
report's capacity model applies to its records). It is chosen by the layer's `Plan` (decided once per layer call by `plan()` from the MoE config,
train/eval and the sequence length; the same plan labels the statistics). `experts` is an
`Experts` pair of callbacks: what runs on the expert buffers. Expert parallelism
(moex/moe/parallel.py) supplies callbacks with all-to-alls around the experts, so no path
here knows about devices. Rows move with `permute.take_rows` (index gathers whose backward
is a gather too), never with one-hot dispatch einsums, which cost as much as the experts.

- capacity: each expert takes at most C assignments per group (sequence; a packed row's
  documents share it, and its padding takes no slot). All first
  choices are placed before any second choice; within a choice, by position (earlier
  tokens win) or by probability (batch-prioritized routing: higher weight wins). A dropped
  assignment contributes zero; the survivors keep their weights unless the plan says
  `renormalize` (rescale them to the token's original total). A token whose every choice
  is dropped gets zero from this block and passes through on the residual.
- dropless: every assignment is computed: rows sorted by expert, then a grouped matmul.
  Padding of packed rows (routing.valid_GxS False) sorts after every real row and belongs
  to no group (the group sizes sum to the real rows): `experts.grouped` leaves it out.
- gather: dropless for a call with few tokens (T*K < E: a decode step at small batch,
  chosen by `plan()` from that shape, evaluation only): each assignment's row is multiplied
  by its own expert's weights, so only the K chosen experts' weights per token are read,
  where a grouped matmul visits all E.
- expert_choice: each expert takes its top-C tokens per group (routing.expert_choice); K is
  0 in the routing, so `kept` is [G, S, 0].

To add a path: write `def my_dispatch(x_GxSxD, routing, plan, experts)` here, add its
`Path` to PATHS, and make `plan()` choose it (see WORKSPACE.md "Adding a dispatch path").
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from moex.config import MoEConfig
from moex.moe import permute
from moex.moe.routing import ROUTERS, Routing


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one MoE layer call dispatches, and what its statistics are labelled with."""

  path: str  # a PATHS key
  capacity_factor: float | None  # None: dropless (the path is not capacity-bound)
  capacity: int | None  # rows per expert and group (sequence); None: dropless
  tokens_per_group: int  # S: a group is one sequence
  num_experts: int
  top_k: int
  min_capacity: int
  train_capacity_factor: float  # training's factor, for "what would training drop here"
  train_capacity: int
  priority: str = "position"  # capacity path: "position" or "probability" (moe.drop_policy)
  renormalize: bool = False  # capacity path: survivors keep the token's total weight


def plan(cfg: MoEConfig, train: bool, tokens_per_group: int,
         num_tokens: int | None = None) -> Plan:
  """The one place that decides the path and capacity of a layer call.

  Training uses moe.dispatch with moe.capacity_factor; evaluation is dropless unless
  moe.eval_capacity_factor > 0. A router with its own path (expert choice) always takes
  it; when that path is capacity-bound, evaluation uses eval_capacity_factor when set, else
  the training factor. A dropless evaluation call
  with so few tokens that T*K < E (`num_tokens` = T, all groups: a decode step at small
  batch) gathers the chosen experts' weights instead of visiting every expert.
  """
  own_path = ROUTERS[cfg.router].path
  if own_path is not None:
    path = own_path
    cf = ((cfg.capacity_factor if train else (cfg.eval_capacity_factor or cfg.capacity_factor))
          if PATHS[path].capacity_bound else None)
  elif train:
    path = cfg.dispatch
    cf = cfg.capacity_factor if PATHS[path].capacity_bound else None
  else:
    cf = cfg.eval_capacity_factor if cfg.eval_capacity_factor > 0 else None
    few = num_tokens is not None and num_tokens * cfg.top_k < cfg.num_experts
    path = "capacity" if cf else "gather" if few else "dropless"
  return Plan(path=path, capacity_factor=cf,
              capacity=None if cf is None else cfg.capacity(tokens_per_group, cf),
              tokens_per_group=tokens_per_group, num_experts=cfg.num_experts,
              top_k=cfg.top_k, min_capacity=cfg.min_capacity,
              train_capacity_factor=cfg.capacity_factor,
              train_capacity=cfg.capacity(tokens_per_group, cfg.capacity_factor),
              priority=cfg.drop_policy, renormalize=cfg.renormalize_after_drop)


class Experts(NamedTuple):
  """What runs on the expert buffers (moex/moe/parallel.py builds these)."""

  # [E, R, D] -> [E, R, D]: every expert applied to its own R buffer rows.
  buffered: Callable[[jax.Array], jax.Array]
  # (rows [M, D] sorted by expert, group sizes [E]) -> (out [M, D], kept [M]): kept is False
  # for rows that were not computed (the bounded expert-parallel buffer overflowed). Rows
  # past sum(sizes) (padding) are in no group: not computed, output zero.
  grouped: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
  # (rows [M, D] in any order, each row's expert [M]) -> (out [M, D], kept [M]): reads only
  # the weights of the experts named (on one device; see moex/moe/parallel.py).
  gathered: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None


# The slot of a padding assignment: past any capacity, so it is never kept.
NO_SLOT = jnp.iinfo(jnp.int32).max


def capacity_positions(expert_index_GxSxK: jax.Array, num_experts: int,
                       priority_GxSxK: jax.Array | None = None,
                       valid_GxS: jax.Array | None = None) -> jax.Array:
  """Each assignment's slot in its expert's buffer, in priority order: [G, S, K] int32.

  First choices of all tokens come before any second choice. Within a choice, tokens go
  in position order, or by decreasing `priority` when it is given (stable for ties).
  Padding (`valid_GxS` False) takes no slot: its assignments get NO_SLOT.
  """
  if valid_GxS is not None:  # an out-of-range expert: its one-hot row is all zeros
    slot_GxSxK = capacity_positions(
        jnp.where(valid_GxS[..., None], expert_index_GxSxK, num_experts), num_experts,
        priority_GxSxK)
    return jnp.where(valid_GxS[..., None], slot_GxSxK, NO_SLOT)
  g, s, k = expert_index_GxSxK.shape
  index_GxKxS = expert_index_GxSxK.transpose(0, 2, 1)
  if priority_GxSxK is not None:
    order_GxKxS = jnp.argsort(-priority_GxSxK.transpose(0, 2, 1), axis=-1, stable=True)
    index_GxKxS = jnp.take_along_axis(index_GxKxS, order_GxKxS, axis=-1)
  onehot_GxKSxE = jax.nn.one_hot(index_GxKxS.reshape(g, k * s), num_experts, dtype=jnp.int32)
  slot_GxKSxE = jnp.cumsum(onehot_GxKSxE, axis=1) - 1
  slot_GxKxS = jnp.sum(slot_GxKSxE * onehot_GxKSxE, axis=-1).reshape(g, k, s)
  if priority_GxSxK is not None:
    unorder_GxKxS = jnp.argsort(order_GxKxS, axis=-1)
    slot_GxKxS = jnp.take_along_axis(slot_GxKxS, unorder_GxKxS, axis=-1)
  return slot_GxKxS.transpose(0, 2, 1)


class BufferRows(NamedTuple):
  """Maps between assignments and the rows of fixed buffers [buckets, G, C] (flattened)."""

  row_TK: jax.Array  # each assignment's buffer row; R (nowhere) when dropped
  assignment_R: jax.Array  # each buffer row's assignment t*K + k; T*K when the row is empty
  token_R: jax.Array  # each buffer row's token; T when empty
  kept_GxSxK: jax.Array  # whether the assignment found a slot


def buffer_rows(bucket_GxSxK: jax.Array, slot_GxSxK: jax.Array, num_buckets: int,
                capacity: int) -> BufferRows:
  """Rows ordered (bucket, group, slot): buckets are experts (capacity path) or
  expert-parallel ranks (moex/moe/parallel.py); slots >= capacity are dropped."""
  g, s, k = bucket_GxSxK.shape
  t, c = g * s, capacity
  rows = num_buckets * g * c
  kept_GxSxK = slot_GxSxK < c
  group_GxSxK = jnp.arange(g, dtype=jnp.int32)[:, None, None]
  row_TK = jnp.where(kept_GxSxK, bucket_GxSxK * (g * c) + group_GxSxK * c + slot_GxSxK,
                     rows).reshape(t * k).astype(jnp.int32)
  assignment_R = jnp.full((rows + 1,), t * k, jnp.int32).at[row_TK].set(
      jnp.arange(t * k, dtype=jnp.int32), unique_indices=False)[:rows]
  token_R = jnp.where(assignment_R < t * k, assignment_R // k, t)
  return BufferRows(row_TK, assignment_R, token_R, kept_GxSxK)


def _combine(y_TxKxD: jax.Array, weight_TxK: jax.Array) -> jax.Array:
  return jnp.einsum("tkd,tk->td", y_TxKxD, weight_TxK.astype(y_TxKxD.dtype))


def _real(weight_GxSxK: jax.Array, routing: Routing) -> jax.Array:
  """Combine weights with padding's set to zero (no routed output for padding)."""
  if routing.valid_GxS is None:
    return weight_GxSxK
  return jnp.where(routing.valid_GxS[..., None], weight_GxSxK, 0.0)


def renormalized(weight_GxSxK: jax.Array, kept_GxSxK: jax.Array) -> jax.Array:
  """Survivors rescaled so each token keeps its original total weight (0 if all dropped)."""
  kept_w = jnp.where(kept_GxSxK, weight_GxSxK, 0.0)
  total, kept_total = weight_GxSxK.sum(-1, keepdims=True), kept_w.sum(-1, keepdims=True)
  return kept_w * jnp.where(kept_total > 0, total / jnp.maximum(kept_total, 1e-30), 0.0)


def capacity_dispatch(x_GxSxD: jax.Array, routing: Routing, plan: Plan,
                      experts: Experts) -> tuple[jax.Array, jax.Array]:
  """Fixed buffers of plan.capacity rows per expert and group; overflow is dropped."""
  g, s, d = x_GxSxD.shape
  k = routing.expert_index_GxSxK.shape[-1]
  e = routing.probs_GxSxE.shape[-1]
  t, c = g * s, plan.capacity
  priority_GxSxK = routing.combine_weight_GxSxK if plan.priority == "probability" else None
  slot_GxSxK = capacity_positions(routing.expert_index_GxSxK, e, priority_GxSxK,
                                  routing.valid_GxS)
  b = buffer_rows(routing.expert_index_GxSxK, slot_GxSxK, e, c)
  buf_RxD = permute.take_rows(x_GxSxD.reshape(t, d), b.token_R, b.row_TK.reshape(t, k))
  out_RxD = experts.buffered(buf_RxD.reshape(e, g * c, d)).reshape(e * g * c, d)
  y_TKxD = permute.take_rows(out_RxD, b.row_TK, b.assignment_R[:, None])
  weight_GxSxK = (renormalized(routing.combine_weight_GxSxK, b.kept_GxSxK) if plan.renormalize
                  else jnp.where(b.kept_GxSxK, routing.combine_weight_GxSxK, 0.0))
  y_TxD = _combine(y_TKxD.reshape(t, k, d), weight_GxSxK.reshape(t, k))
  return y_TxD.reshape(g, s, d), b.kept_GxSxK


def dropless_dispatch(x_GxSxD: jax.Array, routing: Routing, plan: Plan,
                      experts: Experts) -> tuple[jax.Array, jax.Array]:
  """Sorts the T*K assignments by expert and runs one grouped matmul; nothing dropped
  (unless the experts callback bounds its buffers and reports rows it did not compute)."""
  del plan
  g, s, d = x_GxSxD.shape
  k = routing.expert_index_GxSxK.shape[-1]
  e = routing.probs_GxSxE.shape[-1]
  t = g * s
  expert_M = routing.expert_index_GxSxK.reshape(t * k)  # M = T*K assignments, token-major.
  if routing.valid_GxS is not None:  # padding sorts last, in no group: never computed
    expert_M = jnp.where(jnp.repeat(routing.valid_GxS.reshape(t), k), expert_M, e)
  order_M = jnp.argsort(expert_M, stable=True).astype(jnp.int32)  # sorted pos -> assignment
  inverse_M = jnp.argsort(order_M).astype(jnp.int32)  # assignment -> sorted pos
  rows_MxD = permute.take_rows(x_GxSxD.reshape(t, d), order_M // k, inverse_M.reshape(t, k))
  sizes_E = jnp.bincount(expert_M, length=e).astype(jnp.int32)
  out_MxD, kept_M = experts.grouped(rows_MxD, sizes_E)
  y_TKxD = permute.take_rows(out_MxD, inverse_M, order_M[:, None])
  kept_GxSxK = kept_M[inverse_M].reshape(g, s, k)
  weight_GxSxK = _real(jnp.where(kept_GxSxK, routing.combine_weight_GxSxK, 0.0), routing)
  y_TxD = _combine(y_TKxD.reshape(t, k, d), weight_GxSxK.reshape(t, k))
  return y_TxD.reshape(g, s, d), kept_GxSxK


def gather_dispatch(x_GxSxD: jax.Array, routing: Routing, plan: Plan,
                    experts: Experts) -> tuple[jax.Array, jax.Array]:
  """Few tokens (T*K < E, a decode step): each assignment's row times its own expert's
  weights, gathered, so only the chosen experts' weights are read; nothing dropped."""
  del plan
  g, s, d = x_GxSxD.shape
  k = routing.expert_index_GxSxK.shape[-1]
  t = g * s
  expert_M = routing.expert_index_GxSxK.reshape(t * k)  # token-major assignments
  token_M = jnp.arange(t * k, dtype=jnp.int32) // k
  inverse_TxK = jnp.arange(t * k, dtype=jnp.int32).reshape(t, k)
  rows_MxD = permute.take_rows(x_GxSxD.reshape(t, d), token_M, inverse_TxK)
  out_MxD, kept_M = experts.gathered(rows_MxD, expert_M)
  kept_GxSxK = kept_M.reshape(g, s, k)
  weight_GxSxK = _real(jnp.where(kept_GxSxK, routing.combine_weight_GxSxK, 0.0), routing)
  y_TxD = _combine(out_MxD.reshape(t, k, d), weight_GxSxK.reshape(t, k))
  return y_TxD.reshape(g, s, d), kept_GxSxK


def expert_choice_dispatch(x_GxSxD: jax.Array, routing: Routing, plan: Plan,
                           experts: Experts) -> tuple[jax.Array, jax.Array]:
  """Each expert's C chosen tokens through that expert, weighted back onto the tokens."""
  del plan  # the capacity is already in the routing's [G, E, C] token lists
  g, s, d = x_GxSxD.shape
  token_GxExC, weight_GxExC = routing.token_GxExC, routing.weight_GxExC
  _, e, c = token_GxExC.shape
  t = g * s
  src_ExGxC = (token_GxExC + jnp.arange(g, dtype=jnp.int32)[:, None, None] * s
               ).transpose(1, 0, 2)
  src_R = src_ExGxC.reshape(-1)  # buffer row (expert, group, slot) -> token
  inverse_TxE = permute.inverse_of(src_R, t, e)  # a token is taken by at most E experts
  buf_RxD = permute.take_rows(x_GxSxD.reshape(t, d), src_R, inverse_TxE)
  out_RxD = experts.buffered(buf_RxD.reshape(e, g * c, d)).reshape(e * g * c, d)
  weight_R = weight_GxExC.transpose(1, 0, 2).reshape(-1, 1).astype(out_RxD.dtype)
  rows = e * g * c
  inverse_TE = inverse_TxE.reshape(-1)
  # Where each buffer row sits in the flat [T*E] inverse (every row sits exactly once).
  where_R = jnp.zeros((rows + 1,), jnp.int32).at[inverse_TE].set(
      jnp.arange(t * e, dtype=jnp.int32))[:rows]
  y_TxD = permute.take_rows(out_RxD * weight_R, inverse_TE, where_R[:, None])
  y_TxD = y_TxD.reshape(t, e, d).sum(axis=1)
  return y_TxD.reshape(g, s, d), jnp.ones((g, s, 0), bool)


Dispatch = Callable[[jax.Array, Routing, Plan, Experts], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Path:
  """A dispatch path: its function and what the statistics, report and footprint ask of
  it. Calling the path calls the function."""

  fn: Dispatch
  # Each expert takes at most plan.capacity assignments per group and drops the rest (the
  # plan sets a capacity); False: dropless, every assignment is computed.
  capacity_bound: bool
  # What it did not keep is the bounded expert-parallel exchange's overflow (counted as
  # moe_stats' ep_overflow, moe.ep_buffer_factor), not a capacity drop.
  overflow: bool = False
  # A value of moe.dispatch (the training path); others are chosen by plan() alone.
  training_choice: bool = False
  # Why the report's drop-at-any-capacity-factor model (moex/report/capacity.py) does not
  # apply to its records; None: it does (token choice: per-sequence loads vs a capacity).
  no_capacity_model: str | None = None

  def __call__(self, x_GxSxD: jax.Array, routing: Routing, plan: Plan,
               experts: Experts) -> tuple[jax.Array, jax.Array]:
    return self.fn(x_GxSxD, routing, plan, experts)


PATHS: dict[str, Path] = {
    "capacity": Path(capacity_dispatch, capacity_bound=True, training_choice=True),
    "dropless": Path(dropless_dispatch, capacity_bound=False, overflow=True,
                     training_choice=True),
    # Through the same bounded exchange as dropless on expert-parallel ranks.
    "gather": Path(gather_dispatch, capacity_bound=False, overflow=True),
    "expert_choice": Path(expert_choice_dispatch, capacity_bound=True,
                          no_capacity_model="expert choice drops no assignments"),
}


def names(has: Callable[[Path], bool]) -> tuple[str, ...]:
  """The paths that satisfy `has`, in PATHS order."""
  return tuple(name for name, path in PATHS.items() if has(path))
