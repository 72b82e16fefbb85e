"""Logical axis names -> mesh axes. Every partitioning decision goes through this file.

Modules only name the logical axes of a tensor ("embed", "expert", "batch", ...); the
config's `mesh.rules` table says which mesh axes each one is split over.
"""

from __future__ import annotations

from typing import Any, Iterable

import jax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Iterable[tuple[str, Any]]


def logical_to_spec(names: Iterable[str | None], rules: Rules, mesh: Mesh,
                    shape: tuple[int, ...] | None = None) -> P:
  """A PartitionSpec for a tensor with logical axis `names`.

  A mesh axis is used at most once per tensor, and a dimension that its mesh axes do not
  divide stays replicated rather than failing (logged once).
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(names):
    axes = table.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = 1
    for a in axes:
      size *= mesh.shape[a]
    if shape is not None and axes and shape[dim] % size:
      logging.warning("dimension %d (%s, size %d) not divisible by mesh axes %s; replicated",
                      dim, name, shape[dim], axes)
      axes = ()
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  while spec and spec[-1] is None:  # P(None, None) == P() for jit's cache: keep one form
    spec.pop()
  return P(*spec)


def state_shardings(abstract_state: nnx.State, rules: Rules, mesh: Mesh) -> Any:
  """NamedShardings for every variable of an NNX state, as a pure dict."""

  def one(var):
    names = var.get_metadata().get("out_sharding") or (None,) * var.get_value().ndim
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, var.get_value().shape))

  shardings = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(shardings)


def batch_sharding(rules: Rules, mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """The batch is split over the `batch` rule's axes; other dims replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(rules: Rules, mesh: Mesh) -> int:
  """How many ways the batch dimension is split."""
  return split_size("batch", rules, mesh)


# The rules in force while a model is traced (set by the trainer around jit lowering), so
# modules that need mesh axes by name (the MoE shard_map) read them from the one table.
_RULES: list[tuple] = []


class use_rules:  # pylint: disable=invalid-name
  """Context manager: `with sharding.use_rules(cfg.mesh.rules): ...`."""

  def __init__(self, rules: Rules):
    self.rules = tuple(rules)

  def __enter__(self):
    _RULES.append(self.rules)
    return self.rules

  def __exit__(self, *exc):
    _RULES.pop()


def current_rules() -> tuple | None:
  return _RULES[-1] if _RULES else None


def mesh_axes(logical: str, rules: Rules, mesh) -> tuple[str, ...]:
  """The mesh axes (of size > 1) that a logical axis is split over."""
  axes = dict(rules).get(logical)
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


def split_size(logical: str, rules: Rules, mesh) -> int:
  """How many ways a logical axis is split (product of its mesh axes' sizes)."""
  n = 1
  for a in mesh_axes(logical, rules, mesh):
    n *= mesh.shape[a]
  return n
