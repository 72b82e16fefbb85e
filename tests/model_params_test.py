"""moex/model/params.py: the one parameter tree is the Decoder's own; parts, counts, bytes."""

import math

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from experiments import tiny
from moex import config as config_lib
from moex.model import params
from moex.model.decoder import Decoder
from moex.parallel import mesh as mesh_lib
from moex.train import optimizer, state as state_lib


def _cfg(qk_norm="none", **fields):
  """tiny (4 blocks) with every part: a dense first block, shared experts, q/k norms."""
  cd = tiny.get_config()
  cd.model.first_dense_layers, cd.moe.num_shared_experts, cd.moe.d_shared = 1, 2, 64
  cd.model.qk_norm = qk_norm
  for key, value in fields.items():
    section, name = key.split("__")
    cd[section][name] = value
  return config_lib.validate(cd, vocab_size=259)


VARIANTS = {
    "qk-none": lambda: _cfg(),
    "qk-head": lambda: _cfg("head"),
    "qk-full": lambda: _cfg("full", model__num_heads=8, model__num_kv_heads=2),
    "every-other-moe": lambda: _cfg("head", model__moe_every=2, model__dense_layers=(3,),
                                    moe__router="sigmoid_bias"),
    "no-shared-bf16": lambda: _cfg(moe__num_shared_experts=0, model__param_dtype="bfloat16"),
}


def _whole_decoder(cfg) -> dict:
  """{path: (shape, dtype, logical axes)} of every parameter of the whole Decoder."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: Decoder(cfg.model, cfg.moe, nnx.Rngs(0)))
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = var.get_value()
    out[tuple(path)] = (tuple(value.shape), np.dtype(value.dtype),
                        var.get_metadata().get("out_sharding"))
  return out


@pytest.mark.parametrize("name", VARIANTS)
def test_the_tree_is_the_whole_decoders(name):
  cfg = VARIANTS[name]()
  tree = params.tree(cfg)
  assert {leaf.path: (leaf.shape, leaf.dtype, leaf.axes) for leaf in tree} == (
      _whole_decoder(cfg))
  assert len({leaf.path for leaf in tree}) == len(tree)
  assert [leaf.layer for leaf in tree if leaf.layer is not None] == sorted(
      leaf.layer for leaf in tree if leaf.layer is not None)  # blocks in depth order


@pytest.mark.parametrize("name", ["qk-head", "qk-full", "every-other-moe"])
def test_the_count_is_the_real_modules_own(name):
  cfg = VARIANTS[name]()
  with nnx.use_eager_sharding(False):
    model = Decoder(cfg.model, cfg.moe, nnx.Rngs(0))
  own = dict.fromkeys(params.PARTS, 0)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    own[params.part_of(tuple(path), cfg.model)] += var.get_value().size
  assert {p: c.total for p, c in params.counts(cfg).items()} == own
  buffers = jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
  if cfg.moe.router == "sigmoid_bias":  # the router bias is state, not a parameter
    assert buffers and all(b.shape == (cfg.moe.num_experts,) for b in buffers)


def test_counts_by_hand_with_head_norms():
  cfg = _cfg("head")
  m, e = cfg.model, cfg.moe
  d, v, a, f = m.d_model, m.vocab_size, m.head_dim, e.d_expert
  moe_layers = m.num_layers - 1
  c = params.counts(cfg)
  assert c["embedding"] == c["unembedding"] == (v * d, v * d)
  assert c["attention"].total == m.num_layers * d * a * (2 * m.num_heads + 2 * m.num_kv_heads)
  # Two norms of width D per block and the final one; q and k norms of width A per block.
  assert c["norms"] == ((2 * m.num_layers + 1) * d + m.num_layers * 2 * a,) * 2
  assert c["router"].total == moe_layers * d * e.num_experts
  assert c["routed_experts"] == (moe_layers * e.num_experts * 3 * d * f,
                                 moe_layers * e.top_k * 3 * d * f)
  assert c["shared_experts"].total == moe_layers * 3 * d * 2 * 64
  assert c["dense_ffn"].total == 3 * d * m.d_ff
  assert all(c[p].active == c[p].total for p in params.PARTS if p != "routed_experts")
  assert params.MATMUL_PARTS == tuple(p for p in params.PARTS if p != "norms")


def test_part_of_places_every_parameter_or_refuses_it():
  m = _cfg().model  # block_0 dense, blocks 1-3 MoE
  assert params.part_of(("block_0", "ffn", "bias_D"), m) == "dense_ffn"
  assert params.part_of(("block_1", "ffn", "shared", "bias_D"), m) == "shared_experts"
  assert params.part_of(("block_1", "attn", "q_norm", "scale_A"), m) == "norms"
  assert params.part_of(("block_2", "attn", "sink_H"), m) == "attention"
  for path in [("block_1", "ffn", "shared_gate_D"), ("mystery_D",), ("embed", "pos_LxD")]:
    with pytest.raises(ValueError, match="no part for parameter " + "/".join(path)):
      params.part_of(path, m)


def test_each_block_kind_is_traced_once(monkeypatch):
  cfg = _cfg("full", model__num_layers=12)
  params._tree.cache_clear()
  calls = []
  real = params._params
  monkeypatch.setattr(params, "_params", lambda make: calls.append(1) or real(make))
  leaves = params.tree(cfg)
  assert len(calls) == 3  # the top level, one dense block, one MoE block
  assert {leaf.layer for leaf in leaves} == set(range(12)) | {None}
  assert params.tree(cfg) is leaves  # cached per model/moe section


def _mesh():
  return AbstractMesh((1, 2, 4, 1), config_lib.MESH_AXES)  # fsdp=2, expert=4


def test_structs_and_bytes_match_the_trainers_state():
  cfg = _cfg("full")
  tx, _ = optimizer.make(cfg.opt, cfg.train.steps)
  model, _ = state_lib.build(cfg, tx, _mesh())
  state = model.abstract_state["params"]
  mine = params.structs(cfg, _mesh())
  assert jax.tree.structure(mine) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(state)):
    assert (a.shape, a.dtype, a.sharding.spec) == (b.shape, b.dtype, b.sharding.spec)
  sizes = dict(_mesh().shape)
  by_part = dict.fromkeys(params.PARTS, 0)
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    n = params.shard_elements(leaf.shape, leaf.sharding.spec, sizes)
    by_part[params.part_of(tuple(k.key for k in path), cfg.model)] += n * leaf.dtype.itemsize
  got = params.device_bytes(params.tree(cfg), cfg.mesh.rules, _mesh())
  assert got == by_part
  # Routed experts [E, D, F] split over expert=4 and fsdp=2 (D): an eighth on each device.
  experts = params.counts(cfg)["routed_experts"].total
  assert got["routed_experts"] == experts // 8 * 4
  assert math.prod(params.structs(cfg)["unembed_DxV"].shape) == 128 * 259


def test_the_tree_is_the_same_inside_a_mesh_context():
  """The trainer counts FLOPs inside jax.set_mesh: the tree must not take that mesh."""
  cfg = _cfg("head")
  outside = params.tree(cfg)
  params._tree.cache_clear()
  with jax.set_mesh(mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])):
    assert params.tree(cfg) == outside
