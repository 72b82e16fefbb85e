"""The one parameter tree: every parameter of a config's decoder, its part, counts and bytes.

  leaves = params.tree(cfg)           # (Leaf(path, part, shape, dtype, axes), ...)
  params.counts(cfg)                  # {part: Count(total, active)}: FLOPs, footprint, scaling
  params.device_bytes(leaves, cfg.mesh.rules, mesh)   # {part: bytes one device holds}

The tree is the modules' own: nnx.eval_shape of the Decoder's top level (its embedding, final
norm and unembedding) and of one Block of each kind the config uses (dense, MoE), placed at
block_0 ... block_{L-1} as the Decoder names them; nothing is allocated. (Building each kind
once keeps this linear in depth: tracing a whole deep Decoder costs seconds, and the scaling
planner sizes 160 depths.) tests/model_params_test.py checks it against the whole Decoder.

Paths are the keys of the parameters' pure dict (state.build's abstract_state["params"]), e.g.
("block_0", "attn", "q_DxHxA"). part_of is the one labelling function: a new parameter gets a
part there (or by its place: anything under a *norm module is a norm) or part_of refuses it.
Active counts: K of the E routed experts of each MoE layer, everything else whole (the
embedding and the unembedding in both, as in Mixtral's published 46.7B / 12.9B). Buffers
(the aux-loss-free router bias) are not parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from moex.config import Config, ModelConfig, MoEConfig
from moex.model.decoder import Block, Decoder
from moex.parallel import sharding

PARTS = ("embedding", "unembedding", "attention", "norms", "router", "routed_experts",
         "shared_experts", "dense_ffn")
# The parts a token multiplies with in a matmul; norm scales (elementwise) are not FLOPs.
MATMUL_PARTS = tuple(p for p in PARTS if p != "norms")

# The modules of an MoE block's feed-forward part -> their part.
_MOE_FFN = {"router": "router", "experts": "routed_experts", "shared": "shared_experts"}


class Count(NamedTuple):
  """Parameters of one part of the decoder: stored, and used by each token."""

  total: int
  active: int


class Leaf(NamedTuple):
  """One parameter: its path, part, shape, dtype and logical axis names (out_sharding)."""

  path: tuple[str, ...]
  part: str
  shape: tuple[int, ...]
  dtype: np.dtype
  axes: tuple[str | None, ...]

  @property
  def name(self) -> str:
    return "/".join(self.path)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def layer(self) -> int | None:
    """The block index, or None outside the blocks."""
    return _layer(self.path)

  def spec(self, rules, mesh) -> PartitionSpec:
    """Its PartitionSpec on `mesh` under the config's logical-axis `rules`."""
    return sharding.logical_to_spec(self.axes, rules, mesh, self.shape)

  def device_bytes(self, rules, mesh, skip: tuple[str, ...] = ()) -> int:
    """Bytes of one device's shard (mesh axes in `skip` treated as unsplit)."""
    return (shard_elements(self.shape, self.spec(rules, mesh), dict(mesh.shape), skip)
            * self.dtype.itemsize)


def _layer(path: tuple[str, ...]) -> int | None:
  head = path[0]
  return int(head[len("block_"):]) if head.startswith("block_") else None


def part_of(path: tuple[str, ...], model: ModelConfig) -> str:
  """The part of the parameter at `path` (ValueError for a parameter with no part)."""
  layer = _layer(path)
  if any(k.endswith("norm") for k in path[:-1]):  # final_norm, attn_norm, ffn_norm, q/k_norm
    return "norms"
  if path == ("embed", "table_VxD"):
    return "embedding"
  if path == ("unembed_DxV",):
    return "unembedding"
  if layer is not None and len(path) > 2:
    if path[1] == "attn":
      return "attention"
    if path[1] == "ffn" and not model.is_moe_layer(layer):
      return "dense_ffn"
    if path[1] == "ffn" and path[2] in _MOE_FFN:
      return _MOE_FFN[path[2]]
  raise ValueError(f"moex.model.params: no part for parameter {'/'.join(path)}; give it one "
                   "in part_of")


def _params(make) -> list[tuple[tuple[str, ...], nnx.Param]]:
  """(path, abstract nnx.Param) of every parameter of the module `make()` builds."""
  # No mesh, whatever the caller's context (the trainer's jax.set_mesh): nnx.eval_shape would
  # read the logical axis names as mesh axes. The config's rules place parameters later.
  with nnx.use_eager_sharding(False), jax.sharding.use_abstract_mesh(AbstractMesh((), ())):
    module = nnx.eval_shape(make)
  return [(tuple(str(k) for k in path), var)
          for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))]


@functools.lru_cache(maxsize=512)
def _tree(model: ModelConfig, moe: MoEConfig) -> tuple[Leaf, ...]:
  top = _params(lambda: Decoder(dataclasses.replace(model, num_layers=0), moe, nnx.Rngs(0)))
  kinds = {}
  for i in range(model.num_layers):
    kind = model.is_moe_layer(i)
    if kind not in kinds:
      kinds[kind] = _params(lambda kind=kind: Block(model, moe, kind, nnx.Rngs(0)))
  found = top + [((f"block_{i}",) + path, var) for i in range(model.num_layers)
                 for path, var in kinds[model.is_moe_layer(i)]]
  leaves = []
  for path, var in sorted(found, key=lambda pv: _order(pv[0])):
    value = var.get_value()
    axes = var.get_metadata().get("out_sharding") or (None,) * value.ndim
    leaves.append(Leaf(path, part_of(path, model), tuple(value.shape), np.dtype(value.dtype),
                       tuple(axes)))
  return tuple(leaves)


def _order(path: tuple[str, ...]) -> tuple:
  """Embedding, blocks in depth order, then the rest (final norm, unembedding)."""
  layer = _layer(path)
  rank = 0 if path[0] == "embed" else 1 if layer is not None else 2
  return (rank, layer or 0, path)


def tree(cfg: Config) -> tuple[Leaf, ...]:
  """Every parameter of `cfg`'s decoder, labelled (built once per model/moe section)."""
  return _tree(cfg.model, cfg.moe)


def counts(cfg: Config) -> dict[str, Count]:
  """Parameters by part (every part of PARTS, 0 where the model has none): total and active."""
  e, k = cfg.moe.num_experts, cfg.moe.top_k
  total, active = dict.fromkeys(PARTS, 0), dict.fromkeys(PARTS, 0)
  for leaf in tree(cfg):
    total[leaf.part] += leaf.size
    # Routed experts are stacked on a leading E axis; a token uses K of them.
    active[leaf.part] += leaf.size // e * k if leaf.part == "routed_experts" else leaf.size
  return {p: Count(total[p], active[p]) for p in PARTS}


def shard_elements(shape: tuple[int, ...], spec, sizes: dict[str, int],
                   skip: tuple[str, ...] = ()) -> int:
  """Elements of one device's shard of an array of `shape` split per PartitionSpec `spec`
  over mesh axes of `sizes` (axes in `skip` treated as unsplit)."""
  n = 1
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    n *= dim // math.prod(sizes[a] for a in axes if a not in skip)
  return n


def device_bytes(leaves, rules, mesh) -> dict[str, int]:
  """Bytes one device holds of each part (every part of PARTS) on `mesh` under `rules`."""
  out = dict.fromkeys(PARTS, 0)
  for leaf in leaves:
    out[leaf.part] += leaf.device_bytes(rules, mesh)
  return out


def structs(cfg: Config, mesh=None) -> dict[str, Any]:
  """The parameters' pure dict of jax.ShapeDtypeStruct (with NamedShardings under the config's
  rules when `mesh` is given): the layout of state.build's abstract_state["params"]."""
  out: dict[str, Any] = {}
  for leaf in tree(cfg):
    at = out
    for key in leaf.path[:-1]:
      at = at.setdefault(key, {})
    sh = None if mesh is None else NamedSharding(mesh, leaf.spec(cfg.mesh.rules, mesh))
    at[leaf.path[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh)
  return out


# Workdirs written before 2026-12-02 store every norm scale as scale_D, the q/k norms' too
# (now scale_A, scale_HA, scale_JA): the readers restore those under the old names.
_QK_NORMS = ("q_norm", "k_norm")
_OLD_SCALE = "scale_D"


def has_old_names(keys) -> bool:
  """Whether saved flat keys (tuples of strings) name a q/k-norm scale the old way."""
  return any(len(k) >= 2 and k[-2] in _QK_NORMS and k[-1] == _OLD_SCALE for k in keys)


def with_old_names(tree):
  """`tree` (nested dicts, lists, tuples, NamedTuples) with its q/k-norm scales renamed to
  the old scale_D; jax.tree.leaves keeps their order (a q/k norm holds one scale)."""

  def walk(node, parent):
    if isinstance(node, dict):
      return {(_OLD_SCALE if parent in _QK_NORMS and str(k).startswith("scale_") else k):
              walk(v, k) for k, v in node.items()}
    if isinstance(node, tuple) and hasattr(node, "_fields"):
      return type(node)(*(walk(v, parent) for v in node))
    if isinstance(node, (list, tuple)):
      return type(node)(walk(v, parent) for v in node)
    return node

  return walk(tree, None)
