"""Capacity-factor statistics: counted on device every step, turned into JSON at log steps.

Above `moe.stats_max_experts` experts, per-expert lists (expert_load, expert_kept,
rank_load) are written as summaries (sum, percentiles, histogram) so lines stay bounded.

Device side: `layer_stats(routing, kept, plan)` returns a dict of small arrays per MoE
layer; the train step sums them over a logging window (`accumulate`), so nothing leaves the
device between log steps. Host side: `records` turns one window into the `moe_stats.jsonl`
lines, labelled with the same `dispatch.Plan` the layer ran with.

To add a statistic: compute its (psummed) sum in `layer_stats`, turn it into a field in
`records` (and document it below and in WORKSPACE.md); see "Adding a statistic" there.

Padding of packed rows is in no statistic: every count and sum is over real tokens
(`tokens` included); the per-sequence quantities keep the row's length S as their unit.

Fields of a `moe_stats.jsonl` line (one per logged step, split and MoE layer):
  step, split, layer, tokens, num_experts, top_k, dispatch (the path, a dispatch.PATHS key:
  capacity, dropless, gather, expert_choice), capacity (per expert and sequence; null when dropless), capacity_factor
  (null when dropless), tokens_per_group and min_capacity (with num_experts and top_k, what
  moex.config.capacity needs to recompute the capacity at any factor), expert_load (E ints,
  before dropping), expert_kept (E ints, after), dropped_fraction (1 - kept/load),
  needed_capacity_factor (smallest factor that would have dropped nothing in any sequence
  of the window), router_entropy (mean nats over tokens, full distribution over E),
  load_balance_loss, z_loss (means over the window's steps), rank_load (assignments routed
  to each expert-parallel rank's experts), overload_factor (max / mean of rank_load),
  ep_overflow (assignments the bounded expert-parallel exchange had no room for, on the
  paths whose Path.overflow says so: dropless and gather; 0 unless moe.ep_buffer_factor
  bounds it; they are not in expert_kept either), dead_experts (experts with no assignment in the
  window), topk_margin (mean gap between the k-th and (k+1)-th router probability),
  expert_cooccurrence (for K > 1: tokens choosing each pair of experts; all pairs up to 16
  experts, else the top 16), sequence_load_hist (the (sequence, expert) pairs binned by the
  capacity factor each would need, with their loads summed per bin: bin b holds factors in
  [b, b + 1) * bin_width, the last bin everything from 8.0 up), train_capacity_factor and
  train_capacity_dropped_fraction (what the training capacity drops/would drop on these
  tokens; on eval lines this answers "what would training have dropped here").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moex.moe import balancing
from moex.moe.dispatch import PATHS, Plan
from moex.moe.routing import Routing

# Per-sequence loads binned by the capacity factor they would need (bins of HIST_WIDTH up
# to HIST_MAX; the last bin collects everything above), so the drop at any capacity
# factor can be computed afterwards (moex.report's recommendation).
HIST_WIDTH = 0.05
HIST_MAX = 8.0
HIST_BINS = int(round(HIST_MAX / HIST_WIDTH)) + 1

# How each field combines across the steps of a logging window.
MAX_FIELDS = ("max_group_load",)


def _shape_stats(routing: Routing, psum) -> dict:
  """Top-k margin and expert co-occurrence sums.

  topk_margin_sum: sum over tokens of p_(k) - p_(k+1), the gap between the k-th and the
  (k+1)-th router probability (0 when K = E or K = 0). cooccurrence: [E, E] counts of
  tokens that chose both experts (the diagonal is the load).
  """
  expert_index_GxSxK, probs_GxSxE = routing.expert_index_GxSxK, routing.probs_GxSxE
  e = probs_GxSxE.shape[-1]
  k = expert_index_GxSxK.shape[-1]
  if 0 < k < e:
    top = jax.lax.top_k(probs_GxSxE, k + 1)[0]
    margin = jnp.sum(balancing.real_only(top[..., k - 1] - top[..., k], routing)
                     ).astype(jnp.float32)
  else:
    margin = jnp.zeros((), jnp.float32)
  if k == 0:  # expert choice: no per-token choices
    return {"topk_margin_sum": psum(margin), "cooccurrence": jnp.zeros((e, e), jnp.int32)}
  chosen_GxSxE = jnp.sum(jax.nn.one_hot(expert_index_GxSxK, e, dtype=jnp.float32), axis=2)
  chosen_TxE = balancing.real_only(chosen_GxSxE, routing).reshape(-1, e)
  co_ExE = jnp.round(chosen_TxE.T @ chosen_TxE).astype(jnp.int32)
  return {"topk_margin_sum": psum(margin), "cooccurrence": psum(co_ExE)}


def _load_histogram(load_GxE: jax.Array, plan: Plan, psum) -> dict:
  """Counts and load sums of (sequence, expert) pairs by needed capacity factor."""
  e = load_GxE.shape[-1]
  unit = max(plan.tokens_per_group * max(plan.top_k, 1), 1)
  factor = load_GxE.astype(jnp.float32) * e / unit
  bin_Q = jnp.minimum((factor / HIST_WIDTH).astype(jnp.int32), HIST_BINS - 1).reshape(-1)
  ones = jnp.ones_like(bin_Q)
  return {
      "hist_count": psum(jnp.zeros((HIST_BINS,), jnp.int32).at[bin_Q].add(ones)),
      "hist_load": psum(jnp.zeros((HIST_BINS,), jnp.int32).at[bin_Q].add(
          load_GxE.reshape(-1).astype(jnp.int32))),
  }


def layer_stats(routing: Routing, kept_GxSxK: jax.Array, plan: Plan, reduce=None) -> dict:
  """One MoE layer's counts and balancing terms for one step (all on device), from the
  routing, what dispatch kept, and the layer's plan.

  `reduce` (a parallel.Axes) sums over the batch mesh axes inside shard_map, so every field
  is global and the same on any mesh. The loss reads the balancing terms from here.
  """
  psum = reduce.psum if reduce is not None else (lambda x: x)
  pmax = reduce.pmax if reduce is not None else (lambda x: x)
  load_GxE = balancing.routed_load(routing)
  e = load_GxE.shape[-1]
  load_E = psum(jnp.sum(load_GxE, axis=0))
  dropped_GxSxK = balancing.real_only(~kept_GxSxK, routing)  # padding is never "dropped"
  dropped_E = jnp.zeros((e,), jnp.int32).at[routing.expert_index_GxSxK.reshape(-1)].add(
      dropped_GxSxK.reshape(-1).astype(jnp.int32))
  dropped_E = psum(dropped_E)
  return {
      "expert_load": load_E,
      "expert_kept": load_E - dropped_E,
      "train_capacity_kept": psum(jnp.sum(jnp.minimum(load_GxE, plan.train_capacity), axis=0)),
      # The path says what its not-kept assignments are: on the dropless and gather paths
      # only the bounded expert-parallel exchange leaves any out.
      "ep_overflow": dropped_E if PATHS[plan.path].overflow else jnp.zeros((e,), jnp.int32),
      "max_group_load": pmax(jnp.max(load_GxE)),
      "entropy_sum": balancing.router_entropy_sum(routing, psum).astype(jnp.float32),
      "load_balance_loss": balancing.load_balance_loss(routing, load_E, psum),
      "z_loss": balancing.z_loss(routing, psum),
      "seq_load_balance_loss": balancing.sequence_load_balance_loss(routing, load_GxE, psum),
      **_load_histogram(load_GxE, plan, psum),
      **_shape_stats(routing, psum),
      "steps": jnp.ones((), jnp.int32),
  }


def accumulate(acc: dict, new: dict) -> dict:
  """Adds one step's stats to the window (max for the max fields)."""
  return {k: (jnp.maximum(acc[k], new[k]) if k in MAX_FIELDS else acc[k] + new[k])
          for k in acc}


def _summary(values: np.ndarray) -> dict:
  """Percentiles and a 10-bin histogram instead of a long per-expert list."""
  counts, edges = np.histogram(values, bins=10)
  return {"summary": True, "count": int(values.size), "sum": int(values.sum()),
          "percentiles": {str(q): float(np.percentile(values, q)) for q in (0, 5, 25, 50,
                                                                             75, 95, 100)},
          "histogram": {"counts": counts.tolist(), "edges": [float(x) for x in edges]}}


def _per_expert(values: np.ndarray, max_experts: int):
  """The whole list up to `max_experts` entries (moe.stats_max_experts), else a summary."""
  return values.tolist() if values.size <= max_experts else _summary(values)


def _dead(load: np.ndarray, max_experts: int):
  """Experts with no assignment in the window (a count when E is large)."""
  dead = np.flatnonzero(load == 0)
  return dead.tolist() if load.size <= max_experts else {"count": int(dead.size)}


def _cooccurrence(co_ExE: np.ndarray, max_experts: int, top: int = 16) -> dict:
  """How often each pair of experts is chosen by the same token (upper triangle)."""
  e = co_ExE.shape[0]
  i, j = np.triu_indices(e, k=1)
  pairs = co_ExE[i, j]
  if e <= max_experts and e <= 16:
    return {"pairs": [[int(a), int(b), int(c)] for a, b, c in zip(i, j, pairs)]}
  order = np.argsort(-pairs, kind="stable")[:top]
  return {"top_pairs": [[int(i[o]), int(j[o]), int(pairs[o])] for o in order],
          "total_pairs": int(pairs.sum())}


def _histogram(count_Q: np.ndarray, load_Q: np.ndarray) -> dict:
  """Non-empty prefix of the needed-capacity-factor histogram of (sequence, expert) pairs."""
  last = int(np.flatnonzero(count_Q).max()) + 1 if count_Q.any() else 0
  return {"bin_width": HIST_WIDTH, "counts": count_Q[:last].astype(int).tolist(),
          "load_sums": load_Q[:last].astype(int).tolist()}


def _overload(rank_load: np.ndarray) -> float:
  """Max over mean of the assignments each expert-parallel rank receives (1.0 = even)."""
  mean = rank_load.mean()
  return float(rank_load.max() / mean) if mean > 0 else 1.0


def zeros_like(stats: dict) -> dict:
  return jax.tree.map(jnp.zeros_like, stats)


def routing_churn(prev_NxBxL: np.ndarray, cur_NxBxL: np.ndarray) -> np.ndarray:
  """Per MoE layer, the fraction of probe tokens whose first-choice expert changed
  (padding, first choice -1, is not a probe token)."""
  prev, cur = np.asarray(prev_NxBxL), np.asarray(cur_NxBxL)
  if prev.shape != cur.shape:
    raise ValueError(f"routing_churn: probe shapes differ, {prev.shape} vs {cur.shape}")
  axes = tuple(range(1, cur.ndim))
  real = cur >= 0
  return np.sum((prev != cur) & real, axis=axes) / np.maximum(np.sum(real, axis=axes), 1)


def records(stats: dict, *, step: int, split: str, layers: tuple[int, ...], plan: Plan,
            expert_ranks: int = 1, max_experts: int = 64,
            churn_N: np.ndarray | None = None) -> list[dict]:
  """The moe_stats.jsonl lines of one window; `stats` holds host arrays [num_moe_layers,...];
  `plan` is the layer's (dispatch.plan for the split); `churn_N` the routing churn of each
  MoE layer (None: not measured)."""
  out = []
  top_k, s_per_group = plan.top_k, plan.tokens_per_group
  for i, layer in enumerate(layers):
    s = {k: np.asarray(v[i]) for k, v in stats.items()}
    load = s["expert_load"].astype(np.int64)
    kept = s["expert_kept"].astype(np.int64)
    total = int(load.sum())
    e = load.shape[0]
    steps = max(int(s["steps"]), 1)
    tokens = total // top_k
    out.append({
        "step": step,
        "split": split,
        "layer": layer,
        "tokens": tokens,
        "num_experts": e,
        "top_k": top_k,
        "dispatch": plan.path,
        "capacity": plan.capacity,
        "capacity_factor": plan.capacity_factor,
        "tokens_per_group": s_per_group,
        "min_capacity": plan.min_capacity,
        "expert_load": _per_expert(load, max_experts),
        "expert_kept": _per_expert(kept, max_experts),
        "dropped_fraction": 1.0 - kept.sum() / total if total else 0.0,
        "needed_capacity_factor": float(s["max_group_load"]) * e / (s_per_group * top_k),
        "router_entropy": float(s["entropy_sum"]) / max(tokens, 1),
        "load_balance_loss": float(s["load_balance_loss"]) / steps,
        "z_loss": float(s["z_loss"]) / steps,
        "seq_load_balance_loss": float(s["seq_load_balance_loss"]) / steps,
        "dead_experts": _dead(load, max_experts),
        "topk_margin": float(s["topk_margin_sum"]) / max(tokens, 1) if top_k < e else None,
        "expert_cooccurrence": _cooccurrence(s["cooccurrence"], max_experts)
                               if top_k > 1 else None,
        "sequence_load_hist": _histogram(s["hist_count"], s["hist_load"]),
        "rank_load": _per_expert(load.reshape(expert_ranks, -1).sum(-1), max_experts),
        "overload_factor": _overload(load.reshape(expert_ranks, -1).sum(-1)),
        "ep_overflow": int(s["ep_overflow"].sum()),
        "train_capacity": plan.train_capacity,
        "train_capacity_factor": plan.train_capacity_factor,
        "train_capacity_dropped_fraction":
            1.0 - int(s["train_capacity_kept"].sum()) / total if total else 0.0,
        "routing_churn": None if churn_N is None else float(churn_N[i]),
    })
  return out
