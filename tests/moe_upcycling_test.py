"""moex/moe/upcycling.py: dense -> MoE upcycling (copy, noise, drop, granular) and MoE -> more
experts (expand), checked on the logits at step 0; the methods' refusals and options."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import _tiny
from flax import nnx

from moex import config as config_lib
from moex.config import ConfigError
from moex.moe import upcycling as upcycle_lib
from moex.parallel import mesh as mesh_lib
from moex.train import init_from, state as state_lib

VOCAB = 259
# Source weights with distinct statistics per matrix, large enough that every FFN weight
# moves the logits (a wrongly mapped one shows), and the drop test can tell the matrices
# apart: name -> (mean, std).
DIST = {"gate_DxF": (0.05, 0.3), "up_DxF": (-0.05, 0.2), "down_FxD": (0.02, 0.15),
        "kernel_DxE": (0.0, 0.5), "gate_ExDxF": (0.05, 0.3), "up_ExDxF": (-0.05, 0.2),
        "down_ExFxD": (0.02, 0.15), "table_VxD": (0.0, 1.0)}


def _cfg(cd):
  return config_lib.validate(cd, vocab_size=VOCAB)


def _abstract(cd):
  cfg = _cfg(cd)
  return state_lib.abstract_variables(cfg, mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1]))


def _dense_cd(tmp_path):
  c = _tiny(str(tmp_path / "corpus/*.py"), str(tmp_path / "cache"))
  c.model.first_dense_layers = c.model.num_layers
  return c


def _target_cd(tmp_path, **moe):
  c = _tiny(str(tmp_path / "corpus/*.py"), str(tmp_path / "cache"))
  c.moe.dispatch = "dropless"
  c.moe.d_expert = c.model.d_ff
  c.moe.update(moe)
  return c


def _write_source(workdir: pathlib.Path, cd, seed: int = 0):
  """A workdir holding params/ (weights drawn from DIST) and config.json; returns (params,
  buffers) as numpy trees."""
  _, abs_p, abs_b = _abstract(cd)
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name = path[-1].key
    if name.startswith("scale_"):  # norm scales: scale_D, and scale_A etc. of q/k norms
      return (1 + 0.1 * rng.standard_normal(a.shape)).astype(a.dtype)
    mean, std = DIST.get(name, (0.0, 0.2))
    return rng.normal(mean, std, a.shape).astype(a.dtype)

  params = jax.tree_util.tree_map_with_path(draw, abs_p)
  buffers = jax.tree_util.tree_map_with_path(
      lambda p, a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), abs_b)
  init_from.save_params(str(workdir), params, buffers)
  resolved = cd.to_dict()
  resolved["model"]["vocab_size"] = VOCAB
  (workdir / "config.json").write_text(json.dumps(resolved, default=str))
  return params, buffers


def _logits(cd, params, buffers, tokens_BxL):
  graphdef = _abstract(cd)[0]
  fn = jax.jit(lambda p, b, t: nnx.merge(graphdef, p, b)(t, train=False)[0])
  return np.asarray(fn(jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, buffers),
                       tokens_BxL))


def _load(workdir, cd):
  _, abs_p, abs_b = _abstract(cd)
  params, buffers = init_from.load_params(str(workdir), abs_p, abs_b)
  return jax.tree.map(np.array, params), jax.tree.map(np.array, buffers)  # writable copies


def _tokens():
  return jnp.asarray(np.random.default_rng(7).integers(0, 256, (4, 32)), jnp.int32)


@pytest.fixture
def dense_dir(tmp_path):
  """(source workdir, its config, params, buffers) of a dense model."""
  cd = _dense_cd(tmp_path)
  return (tmp_path / "dense", cd, *_write_source(tmp_path / "dense", cd))


@pytest.fixture
def dense(dense_dir):
  """dense_dir and the dense model's logits on _tokens()."""
  return (*dense_dir, _logits(*dense_dir[1:], _tokens()))


def _up(source, tmp_path, cd, name="up", **opts):
  cfg, record = upcycle_lib.upcycle(str(source), str(tmp_path / name), cd,
                                    upcycle_lib.Options(**opts))
  params, buffers = _load(tmp_path / name, cd)
  return cfg, record, params, buffers


COPY_ROUTERS = {"topk_softmax": {}, "softmax_topk": {"renormalize": True}, "sigmoid_bias": {}}


@pytest.mark.slow
@pytest.mark.parametrize("router", list(COPY_ROUTERS))
def test_copy_equals_the_dense_model_and_a_wrong_weight_shows(dense, tmp_path, router):
  src, _, src_p, _, want = dense
  cd = _target_cd(tmp_path, router=router, **COPY_ROUTERS[router])
  if router == "topk_softmax":
    cd.model.first_dense_layers = 1  # block 0 stays dense (copied), block 1 upcycled
  cfg, record, params, buffers = _up(src, tmp_path, cd, method="copy")
  assert record["step0_same_as_source"] and record["moe_layers"] == list(cfg.model.moe_layers)
  got = _logits(cd, params, buffers, _tokens())
  assert np.max(np.abs(got - want)) <= 1e-5
  np.testing.assert_array_equal(params["block_1"]["ffn"]["experts"]["up_ExDxF"][3],
                                src_p["block_1"]["ffn"]["up_DxF"])
  if router == "sigmoid_bias":
    np.testing.assert_array_equal(buffers["block_1"]["ffn"]["router"]["bias_E"], 0)
  # Negative control: expert 2 of block 1 with gate and up swapped.
  ex = params["block_1"]["ffn"]["experts"]
  ex["gate_ExDxF"][2], ex["up_ExDxF"][2] = ex["up_ExDxF"][2].copy(), ex["gate_ExDxF"][2].copy()
  assert np.max(np.abs(_logits(cd, params, buffers, _tokens()) - want)) > 1e-3


GRANULAR = {  # router, moe overrides: G = d_ff (64) / d_expert
    "topk_softmax": {"d_expert": 32, "num_experts": 4, "top_k": 2},  # G=2, 2 copies, k'=1
    "softmax_topk": {"d_expert": 16, "num_experts": 8, "top_k": 4, "renormalize": True},
    "sigmoid_bias": {"d_expert": 32, "num_experts": 8, "top_k": 4, "routed_scaling": 2.0},
    "hash": {"d_expert": 16, "num_experts": 8, "top_k": 4},
}


@pytest.mark.slow
@pytest.mark.parametrize("router", list(GRANULAR))
def test_granular_equals_the_dense_model_with_its_scaling(dense, tmp_path, router):
  src, _, src_p, _, want = dense
  cd = _target_cd(tmp_path, router=router, **GRANULAR[router])
  cfg, record, params, buffers = _up(src, tmp_path, cd, method="granular")
  g = 64 // cfg.moe.d_expert
  assert record["granularity"] == g and record["step0_same_as_source"]
  assert np.max(np.abs(_logits(cd, params, buffers, _tokens()) - want)) <= 1e-5
  ffn, dense_ffn = params["block_0"]["ffn"], src_p["block_0"]["ffn"]
  f = cfg.moe.d_expert
  for e in range(cfg.moe.num_experts):  # expert c*G + s is shard s, down times G/scaling
    s = e % g
    np.testing.assert_array_equal(ffn["experts"]["gate_ExDxF"][e],
                                  dense_ffn["gate_DxF"][:, s * f:(s + 1) * f])
    np.testing.assert_allclose(ffn["experts"]["down_ExFxD"][e] * cfg.moe.routed_scaling / g,
                               dense_ffn["down_FxD"][s * f:(s + 1) * f], rtol=1e-6)
  router_DxE = ffn["router"]["kernel_DxE"]
  for c in range(cfg.moe.num_experts // g):  # one virtual group per copy: tied columns
    assert np.all(router_DxE[:, c * g:(c + 1) * g] == router_DxE[:, c * g:c * g + 1])
  # Negative controls: one row of one expert's down projection from the wrong shard, and
  # the experts left unscaled.
  down = ffn["experts"]["down_ExFxD"]
  wrong = down.copy()
  wrong[0, 0] = down[1, 0]
  bad = {**params, "block_0": {**params["block_0"], "ffn": {
      **ffn, "experts": {**ffn["experts"], "down_ExFxD": wrong}}}}
  assert np.max(np.abs(_logits(cd, bad, buffers, _tokens()) - want)) > 1e-4
  if cfg.moe.routed_scaling == g:  # the scaling is the router's: the weights are the shards
    return
  unscaled = {**params, "block_0": {**params["block_0"], "ffn": {
      **ffn, "experts": {**ffn["experts"], "down_ExFxD": down * cfg.moe.routed_scaling / g}}}}
  assert np.max(np.abs(_logits(cd, unscaled, buffers, _tokens()) - want)) > 1e-3


def _differing_units(expert, source, axis):
  """Hidden units (columns for axis 1, rows for axis 0) where expert and source differ."""
  diff = expert != source
  return set(np.flatnonzero(diff.any(axis=1 - axis))), bool(
      np.all(diff.any(axis=1 - axis) == diff.all(axis=1 - axis)))


def test_drop_reinitializes_exactly_r_of_the_units_with_the_source_statistics(dense_dir,
                                                                             tmp_path):
  src, _, src_p, _ = dense_dir
  cd = _target_cd(tmp_path, num_experts=8)
  _, record, params, _ = _up(src, tmp_path, cd, method="drop", drop_ratio=0.25)
  assert not record["step0_same_as_source"]
  ex, dense_ffn = params["block_0"]["ffn"]["experts"], src_p["block_0"]["ffn"]
  fresh = {"gate": [], "up": [], "down": []}
  unit_sets = []
  for e in range(8):
    units = []
    for name, src_name, axis in (("gate", "gate_DxF", 1), ("up", "up_DxF", 1),
                                 ("down", "down_FxD", 0)):
      w = ex[{"gate": "gate_ExDxF", "up": "up_ExDxF", "down": "down_ExFxD"}[name]][e]
      got, whole = _differing_units(w, dense_ffn[src_name], axis)
      assert whole  # a re-initialized unit differs in every entry, the others in none
      units.append(got)
      idx = sorted(got)
      fresh[name].append(w[:, idx] if axis == 1 else w[idx, :])
    assert units[0] == units[1] == units[2] and len(units[0]) == 16  # 0.25 x 64, per expert
    unit_sets.append(frozenset(units[0]))
  assert len(set(unit_sets)) == 8  # each expert draws its own units
  for name, src_name in (("gate", "gate_DxF"), ("up", "up_DxF"), ("down", "down_FxD")):
    x, ref = np.concatenate([f.ravel() for f in fresh[name]]), dense_ffn[src_name]
    # 4096 draws: the mean within 4 standard errors, the std within 5% of the source's.
    assert abs(x.mean() - ref.mean()) < 4 * ref.std() / np.sqrt(x.size), name
    assert x.std() == pytest.approx(ref.std(), rel=0.05), name


def test_noise_replaces_exactly_the_fraction_of_entries(dense_dir, tmp_path):
  src, _, src_p, _ = dense_dir
  cd = _target_cd(tmp_path)
  _, _, params, _ = _up(src, tmp_path, cd, method="noise", noise_fraction=0.25, noise_std=0.7)
  ex, dense_ffn = params["block_1"]["ffn"]["experts"], src_p["block_1"]["ffn"]
  replaced = []
  for name, src_name in (("gate_ExDxF", "gate_DxF"), ("down_ExFxD", "down_FxD")):
    for e in range(4):
      diff = ex[name][e] != dense_ffn[src_name]
      assert diff.sum() == round(0.25 * diff.size)
      replaced.append(ex[name][e][diff])
  x = np.concatenate(replaced)
  assert x.std() == pytest.approx(0.7, rel=0.05) and abs(x.mean()) < 4 * 0.7 / np.sqrt(x.size)


@pytest.fixture
def moe_source(tmp_path):
  """An MoE workdir (E=4, K=2, topk_softmax): (workdir, config, params, buffers, logits)."""
  cd = _target_cd(tmp_path, d_expert=32, router="topk_softmax")
  params, buffers = _write_source(tmp_path / "moe", cd)
  return tmp_path / "moe", cd, params, buffers, _logits(cd, params, buffers, _tokens())


@pytest.mark.slow
def test_expand_preserves_experts_and_routing_mass_and_what_it_does_not(moe_source, tmp_path):
  src, src_cd, src_p, src_b, want = moe_source
  # top_k x2 with every expert doubled: the same model exactly.
  cd = _target_cd(tmp_path, d_expert=32, num_experts=8, top_k=4)
  _, record, params, buffers = _up(src, tmp_path, cd, name="x4", method="expand")
  assert record["step0_same_as_source"]
  assert np.max(np.abs(_logits(cd, params, buffers, _tokens()) - want)) <= 1e-5
  ffn, old = params["block_1"]["ffn"], src_p["block_1"]["ffn"]
  for j in range(8):
    np.testing.assert_array_equal(ffn["experts"]["down_ExFxD"][j],
                                  old["experts"]["down_ExFxD"][j % 4])
  x_TxD = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
  p_new = jax.nn.softmax(x_TxD @ ffn["router"]["kernel_DxE"], axis=-1)
  p_old = jax.nn.softmax(x_TxD @ old["router"]["kernel_DxE"], axis=-1)
  np.testing.assert_allclose(p_new[:, :4] + p_new[:, 4:], p_old, atol=1e-6)
  np.testing.assert_array_equal(params["embed"]["table_VxD"], src_p["embed"]["table_VxD"])
  # The recipe, top_k unchanged (2 of 8): not the source's output; each token's two
  # choices are the two copies of its first choice, i.e. the source with top_k = 1.
  cd2 = _target_cd(tmp_path, d_expert=32, num_experts=8, top_k=2)
  _, record2, params2, buffers2 = _up(src, tmp_path, cd2, name="x2", method="expand")
  assert not record2["step0_same_as_source"]
  got = _logits(cd2, params2, buffers2, _tokens())
  assert np.max(np.abs(got - want)) > 1e-3
  top1 = src_cd.copy_and_resolve_references()
  top1.moe.top_k = 1
  assert np.max(np.abs(got - _logits(top1, src_p, src_b, _tokens()))) <= 1e-5


REFUSALS = [  # (method, moe overrides, model overrides, the key the line must name)
    ("copy", {"d_expert": 32}, {}, "moe.d_expert"),
    ("granular", {"d_expert": 24}, {}, "moe.d_expert"),
    ("granular", {"d_expert": 32, "num_experts": 3, "top_k": 2}, {}, "moe.num_experts"),
    ("granular", {"d_expert": 16, "num_experts": 8, "top_k": 2}, {}, "moe.top_k"),
    ("granular", {"d_expert": 32, "router": "softmax_topk"}, {}, "moe.renormalize"),
    ("granular", {"d_expert": 32, "router": "random"}, {}, "moe.router"),
    ("copy", {"num_shared_experts": 1}, {}, "moe.num_shared_experts"),
    ("copy", {}, {"d_model": 48}, "model.d_model"),
    ("copy", {}, {"num_kv_heads": 2}, "model.num_kv_heads"),
    ("copy", {}, {"first_dense_layers": 2}, "model.first_dense_layers"),  # no MoE block
    ("copy", {}, {"first_dense_layers": 1, "d_ff": 96}, "model.d_ff"),
    ("expand", {}, {}, "model.first_dense_layers"),
]


@pytest.mark.parametrize("method,moe,model,key", REFUSALS)
def test_bad_input_is_one_line_naming_the_key(dense_dir, tmp_path, method, moe, model, key):
  cd = _target_cd(tmp_path, **moe)
  cd.model.update(model)
  with pytest.raises(ConfigError) as e:
    upcycle_lib.upcycle(str(dense_dir[0]), str(tmp_path / "up"), cd,
                        upcycle_lib.Options(method=method))
  line = str(e.value)
  assert key in line and "\n" not in line, line
  assert not (tmp_path / "up" / "config.json").exists()


def test_dense_methods_refuse_an_moe_source_and_expand_needs_a_multiple(moe_source, tmp_path):
  src = str(moe_source[0])
  with pytest.raises(ConfigError, match=r"moe/config.json: model.first_dense_layers=0, "
                     r"model.moe_every=1 makes block 0 an MoE block; --method=drop upcycles"):
    upcycle_lib.upcycle(src, str(tmp_path / "a"), _target_cd(tmp_path),
                        upcycle_lib.Options(method="drop"))
  with pytest.raises(ConfigError, match=r"^moe.num_experts: 6 is not a multiple of .*'s 4;"):
    upcycle_lib.upcycle(src, str(tmp_path / "b"), _target_cd(tmp_path, d_expert=32,
                                                               num_experts=6),
                        upcycle_lib.Options(method="expand"))
  dense_target = _target_cd(tmp_path, d_expert=32)
  dense_target.model.first_dense_layers = 1
  with pytest.raises(ConfigError, match=r"makes block 0 dense, which is MoE in"):
    upcycle_lib.upcycle(src, str(tmp_path / "c"), dense_target,
                        upcycle_lib.Options(method="expand"))
  with pytest.raises(upcycle_lib.UpcycleError, match=r"^--drop_ratio=1.5: out of range"):
    upcycle_lib.upcycle(src, str(tmp_path / "d"), _target_cd(tmp_path),
                        upcycle_lib.Options(method="drop", drop_ratio=1.5))


@pytest.mark.parametrize("flag", [f.name for f in upcycle_lib.option_fields()])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_float_options_must_be_finite_one_line(dense_dir, tmp_path, flag, value):
  """issue 25: every float flag finite (inf passed `>= 0`; nan read as "out of range")."""
  with pytest.raises(upcycle_lib.UpcycleError) as e:
    upcycle_lib.upcycle(str(dense_dir[0]), str(tmp_path / "up"), _target_cd(tmp_path),
                        upcycle_lib.Options(**{flag: value}))
  assert str(e.value).startswith(f"--{flag}={value}: must be finite and "), str(e.value)
  assert not (tmp_path / "up").exists()


def test_a_method_is_one_registry_entry():
  """Every method names its source kind; every setting is a float Options field (a flag)."""
  assert list(upcycle_lib.METHODS) == ["copy", "noise", "drop", "granular", "expand"]
  assert {m.source for m in upcycle_lib.METHODS.values()} == {"dense", "moe"}
  assert [f.name for f in upcycle_lib.option_fields()] == [
      "router_std", "noise_fraction", "noise_std", "drop_ratio"]
  with pytest.raises(upcycle_lib.UpcycleError, match=r"^--method=nope: unknown \(known: copy"):
    upcycle_lib.Options(method="nope").check()
