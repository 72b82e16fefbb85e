"""Expert parallelism: the MoE layer inside `jax.shard_map`, tokens moved by all-to-all.

Each device routes its own tokens (the batch is split over the `batch` rule's mesh axes),
sends every assignment to the device that holds its expert (experts split over the
`expert` rule's axes, expert e on expert-rank e // E_local), runs its local experts, and
sends the results back. An expert's hidden width may also be split (the `expert_mlp` rule,
usually `tensor`): each shard computes part of the down projection and a psum adds them.

This file supplies the dispatch paths' expert callbacks (`experts`, a dispatch.Experts):
the paths themselves (moex/moe/dispatch.py) never see devices.
- buffered (capacity and expert-choice paths): the [E, G*C, D] buffer is already
  fixed-size, so one all_to_all there and one back.
- gathered (gather path, T*K < E): on one expert rank, each row times its own expert's
  weights (only those are read); across ranks, the dropless exchange below.
- grouped (dropless path): rows arrive sorted by expert (padding of packed rows last, in
  no group: never sent, so it takes no room in the pair buffers); each device sends each
  other a padded buffer of P rows (`pair_rows`): P = M_local (nothing can overflow) when
  moe.ep_buffer_factor is 0, else ceil(factor * M_local / ranks). Rows past the bound, the
  last rows in expert order of that pair, are not computed: they are returned as not kept
  and counted (`ep_overflow` in the statistics), never silently.
  (`jax.lax.ragged_all_to_all` would avoid the padding on GPU/TPU but is not implemented on
  XLA:CPU, where every test runs; it is not used yet.)

`shard_moe` wraps the layer's routed part in shard_map with partition specs derived from the
experts' logical axis names and the config's rules (moex/parallel/sharding.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moex.moe import dispatch, experts as experts_lib, permute
from moex.parallel import sharding

# The logical axes the MoE shard_map splits over; every other axis of its operands is
# whole inside it (jit gathers, e.g., the fsdp-split model width before the call).
SHARD_MAP_AXES = ("batch", "expert", "expert_mlp")


@dataclasses.dataclass(frozen=True)
class Axes:
  """The mesh axes the MoE layer runs over (all empty on one device)."""

  batch: tuple[str, ...] = ()  # tokens are split over these; statistics psum over them
  expert: tuple[str, ...] = ()  # experts are split over these
  expert_size: int = 1
  tensor: tuple[str, ...] = ()  # each expert's hidden width is split over these
  tensor_size: int = 1

  def psum(self, x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, self.batch) if self.batch else x

  def pmax(self, x: jax.Array) -> jax.Array:
    return jax.lax.pmax(x, self.batch) if self.batch else x

  def psum_tensor(self, x: jax.Array) -> jax.Array:
    return jax.lax.psum(x, self.tensor) if self.tensor else x


def _a2a(x: jax.Array, ax: Axes, split_axis: int, concat_axis: int) -> jax.Array:
  return jax.lax.all_to_all(x, ax.expert, split_axis, concat_axis, tiled=True)


def pair_rows(rows_local: int, ranks: int, factor: float) -> int:
  """Rows each device may send to each other device on the dropless path."""
  if factor <= 0:
    return rows_local
  return min(rows_local, math.ceil(factor * rows_local / ranks))


def experts(w: experts_lib.ExpertWeights, ax: Axes, backend: str,
            buffer_factor: float = 0.0) -> dispatch.Experts:
  """The dispatch callbacks for this device's expert weights `w` (all E on one device)."""

  def buffered(buf_ExRxD: jax.Array) -> jax.Array:
    if ax.expert_size > 1:
      buf_ExRxD = _a2a(buf_ExRxD, ax, 0, 1)  # -> [E_local, ranks * R, D]
    out = ax.psum_tensor(experts_lib.buffered(w, buf_ExRxD))
    if ax.expert_size > 1:
      out = _a2a(out, ax, 1, 0)  # -> [E, R, D]
    return out

  def local(rows_MxD: jax.Array, sizes_E: jax.Array) -> jax.Array:
    if backend == "tiled":  # its layout needs every row in a group: rows past the groups
      # (padding, zero rows) go to the last one
      sizes_E = sizes_E.at[-1].add(rows_MxD.shape[0] - jnp.sum(sizes_E))
    return ax.psum_tensor(experts_lib.grouped(w, rows_MxD, sizes_E, backend))

  if ax.expert_size == 1:
    grouped = lambda rows_MxD, sizes_E: (local(rows_MxD, sizes_E),
                                         jnp.ones(rows_MxD.shape[:1], bool))
    gathered = lambda rows_MxD, expert_M: (
        ax.psum_tensor(experts_lib.gathered(w, rows_MxD, expert_M)),
        jnp.ones(rows_MxD.shape[:1], bool))
  else:
    grouped = functools.partial(_ep_grouped, local=local, ax=ax, backend=backend,
                                buffer_factor=buffer_factor)
    gathered = functools.partial(_ep_gathered, grouped=grouped,
                                 num_experts=w.gate_ExDxF.shape[0] * ax.expert_size)
  return dispatch.Experts(buffered, grouped, gathered)


def _ep_gathered(rows_MxD: jax.Array, expert_M: jax.Array, *, grouped, num_experts: int
                 ) -> tuple[jax.Array, jax.Array]:
  """The gather path across expert-parallel ranks: the rows are sorted by expert and sent
  to their experts' owners (the dropless exchange), where each owner's grouped matmul
  visits its E / ranks local experts; results come back in the rows' own order."""
  order_M = jnp.argsort(expert_M, stable=True).astype(jnp.int32)
  inverse_M = jnp.argsort(order_M).astype(jnp.int32)
  sizes_E = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32)
  out_MxD, kept_M = grouped(rows_MxD[order_M], sizes_E)
  return out_MxD[inverse_M], kept_M[inverse_M]


def _ep_grouped(rows_MxD: jax.Array, sizes_E: jax.Array, *,
                local: Callable[[jax.Array, jax.Array], jax.Array], ax: Axes, backend: str,
                buffer_factor: float) -> tuple[jax.Array, jax.Array]:
  """Rows sorted by (global) expert, through their owners and back: (out [M, D], kept [M])."""
  m, d = rows_MxD.shape
  n = ax.expert_size
  e_local = sizes_E.shape[0] // n
  p = pair_rows(m, n, buffer_factor)
  # Stage 1: a fixed buffer per destination rank (dispatch's row maps, one group, K = 1).
  ends_E = jnp.cumsum(sizes_E)
  # Rows past the groups (padding of packed rows) have no expert: never sent (slot p).
  in_group_M = jnp.arange(m) < ends_E[-1]
  expert_M = jnp.minimum(jnp.searchsorted(ends_E, jnp.arange(m), side="right"),
                         sizes_E.shape[0] - 1).astype(jnp.int32)
  rank_M = expert_M // e_local
  rank_start_X = (jnp.cumsum(sizes_E.reshape(n, e_local).sum(-1))
                  - sizes_E.reshape(n, e_local).sum(-1))
  slot_M = jnp.where(in_group_M, jnp.arange(m, dtype=jnp.int32) - rank_start_X[rank_M], p)
  b = dispatch.buffer_rows(rank_M.reshape(1, m, 1), slot_M.reshape(1, m, 1), n, p)
  rows = n * p
  filled_R = b.assignment_R < m
  local_expert_R = jnp.where(filled_R, expert_M[jnp.minimum(b.assignment_R, m - 1)] % e_local,
                             e_local)
  send_RxD = permute.take_rows(rows_MxD, b.token_R, b.row_TK.reshape(m, 1))
  recv_RxD = _a2a(send_RxD.reshape(n, p, d), ax, 0, 0).reshape(rows, d)
  recv_expert_R = _a2a(local_expert_R.reshape(n, p), ax, 0, 0).reshape(rows)

  # Stage 2: at the owner, sort received rows by local expert (padding, id E_local, last).
  order_R = jnp.argsort(recv_expert_R, stable=True).astype(jnp.int32)
  inverse_R = jnp.argsort(order_R).astype(jnp.int32)
  sorted_RxD = permute.take_rows(recv_RxD, order_R, inverse_R[:, None])
  local_sizes_E = jnp.bincount(recv_expert_R, length=e_local + 1)[:e_local].astype(jnp.int32)
  out_sorted_RxD = local(sorted_RxD, local_sizes_E)
  out_RxD = permute.take_rows(out_sorted_RxD, inverse_R, order_R[:, None])
  back_RxD = _a2a(out_RxD.reshape(n, p, d), ax, 0, 0).reshape(rows, d)
  out_MxD = permute.take_rows(back_RxD, b.row_TK, b.assignment_R[:, None])
  return out_MxD, b.kept_GxSxK.reshape(m)


def axes(mesh, rules: sharding.Rules) -> Axes:
  """The MoE layer's mesh axes under the config's rules."""
  return Axes(batch=sharding.mesh_axes("batch", rules, mesh),
              expert=sharding.mesh_axes("expert", rules, mesh),
              expert_size=sharding.split_size("expert", rules, mesh),
              tensor=sharding.mesh_axes("expert_mlp", rules, mesh),
              tensor_size=sharding.split_size("expert_mlp", rules, mesh))


def shard_moe(fn, mesh, args: tuple, returns_bias: bool):
  """Runs `fn(router, bias, weights, x, tokens, rng, valid, *, ax)` (moe_forward) under
  shard_map (`valid` may be None).

  Specs come from each operand's logical axis names, keeping only SHARD_MAP_AXES.
  Returns fn's (y, stats, first choice, new bias or None).
  """
  rules = sharding.current_rules()
  if rules is None:
    raise RuntimeError("MoEBlock on a multi-device mesh needs the config's rules: wrap the "
                       "call in `with sharding.use_rules(cfg.mesh.rules)`")
  moe_rules = tuple((k, v) for k, v in rules if k in SHARD_MAP_AXES)
  spec = lambda *names: sharding.logical_to_spec(names, moe_rules, mesh)
  # Adapters (LoRA) are split like their experts.
  w_spec = experts_lib.ExpertWeights(
      *(spec(*names) for names in experts_lib.LOGICAL_AXES[:3]),
      None if args[2].adapters is None else experts_lib.ExpertAdapters(
          *(spec(*names) for names in experts_lib.ADAPTER_AXES)))
  bias_spec = None if args[1] is None else P()
  valid_spec = None if args[6] is None else spec("batch", None)
  in_specs = (P(), bias_spec, w_spec, spec("batch", None, None), spec("batch", None), P(),
              valid_spec)
  out_specs = (spec("batch", None, None), P(), spec("batch", None),
               P() if returns_bias else None)
  return jax.shard_map(functools.partial(fn, ax=axes(mesh, rules)), mesh=mesh,
                       in_specs=in_specs, out_specs=out_specs)(*args)
